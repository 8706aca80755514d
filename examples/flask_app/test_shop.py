"""The example's own tests (``pytest`` in this directory): the ``klime_events`` fixture
records the events of every client created during a test, so nothing is sent."""

from __future__ import annotations

from typing import Any

from shop import create_app

# Nothing is sent during a test, but the app's configuration is still checked.
TEST_CONFIG = {"TESTING": True, "KLIME_WRITE_KEY": "test-write-key"}


def test_signup_is_tracked(klime_events: Any) -> None:
    app = create_app(TEST_CONFIG)  # built inside the test: its client is a capturing one
    response = app.test_client().post("/signup", json={"user_id": "u1", "plan": "pro"})

    assert response.json == {"ok": True}
    klime_events.assert_identified("u1", traits={"plan": "pro"})
    klime_events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"}, count=1)


def test_upgrade_waits_for_klime(klime_events: Any) -> None:
    app = create_app(TEST_CONFIG)
    response = app.test_client().get("/upgrade", query_string={"user_id": "u2"})

    assert response.json == {"accepted": 1}
    klime_events.assert_tracked("Plan Upgraded", user_id="u2")


def test_send_test_event_command(klime_events: Any) -> None:
    app = create_app(TEST_CONFIG)
    result = app.test_cli_runner().invoke(args=["send-test-event", "--count", "2"])

    assert result.exit_code == 0, result.output
    klime_events.assert_tracked("Test Event", user_id="flask-test-user", count=2)
