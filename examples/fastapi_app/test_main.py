"""The example's own tests (``pytest`` in this directory). ``TestClient(app)`` used as a
context manager runs the lifespan, so the client is created inside the test, where the
``klime_events`` fixture makes it a capturing one: nothing is sent."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient
from main import app


def test_signup_is_tracked(klime_events: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", "test-write-key")  # checked, never used
    with TestClient(app) as http:
        assert http.post("/signup", json={"user_id": "u1", "plan": "pro"}).json() == {"ok": True}

    klime_events.assert_identified("u1", traits={"plan": "pro"})
    klime_events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"}, count=1)


def test_upgrade_waits_for_klime(klime_events: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", "test-write-key")
    with TestClient(app) as http:
        assert http.get("/upgrade", params={"user_id": "u2"}).json() == {"accepted": 1}

    klime_events.assert_tracked("Plan Upgraded", user_id="u2")
