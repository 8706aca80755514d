"""The example's own tests, run with ``python manage.py test``: klime.testing records the
events instead of sending them (no write key or network needed during the tests)."""

from __future__ import annotations

import io

from django.core.management import call_command
from django.test import SimpleTestCase

from klime.testing import capture


class ShopTests(SimpleTestCase):
    def test_signup_is_tracked(self) -> None:
        with capture() as events:
            response = self.client.post("/signup", {"user_id": "u1", "plan": "pro"})
        self.assertEqual(response.json(), {"ok": True})
        events.assert_identified("u1", traits={"plan": "pro"})
        events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"}, count=1)

    def test_upgrade_waits_for_klime(self) -> None:
        with capture() as events:
            response = self.client.get("/upgrade", {"user_id": "u2"})
        self.assertEqual(response.json(), {"accepted": 1})
        events.assert_tracked("Plan Upgraded", user_id="u2")

    def test_send_test_event_command(self) -> None:
        out = io.StringIO()
        with capture() as events:
            call_command("send_test_event", "--count", "2", stdout=out)
        self.assertIn("sent 0, failed 0, unsent 0", out.getvalue())
        events.assert_tracked("Test Event", user_id="django-test-user", count=2)
