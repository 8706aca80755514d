"""Tests for klime.testing.MockSender: a function answers as Klime's API would, and the
real pipeline (background transport, retry loop, 413 halving, callbacks, ledger) runs
against it. Every test goes through a real Client."""

from __future__ import annotations

import time

import pytest

import klime
from conftest import conserved
from klime.testing import MockRequest, MockResponse, MockSender


def make_client(sender: MockSender, **options):
    errors: list = []
    client = klime.Client(sender=sender, on_error=lambda err, events: errors.append((err, events)), **options)
    return client, errors


def test_by_default_every_batch_is_accepted_and_recorded():
    sender = MockSender()
    client, errors = make_client(sender)
    for n in range(3):
        client.track("Signed Up", {"n": n}, user_id=f"u{n}")
    assert client.flush(5).unsent == 0
    assert [e["event"] for e in sender.events] == ["Signed Up"] * 3
    assert [e["userId"] for e in sender.events] == ["u0", "u1", "u2"]
    assert sender.requests[0].body.startswith(b'{"batch":[')
    stats = client.stats()
    assert stats["sent"] == 3 and conserved(stats) and not errors
    client.shutdown(5)


def test_a_transient_status_is_retried_with_the_same_bytes():
    def handler(request: MockRequest):
        return 503 if request.number == 1 else None

    sender = MockSender(handler, retry_initial_delay=10)
    client, errors = make_client(sender)
    client.track("Paid", user_id="u1")
    assert client.flush(5).unsent == 0
    first, second = sender.requests
    assert first.body == second.body and second.number == 2
    stats = client.stats()
    assert stats["sent"] == 1 and stats["retries"] == 1 and not errors
    client.shutdown(5)


def test_retry_after_is_honoured():
    def handler(request: MockRequest):
        return MockResponse(429, retry_after="1") if request.number == 1 else None

    sender = MockSender(handler, retry_initial_delay=10)
    client, errors = make_client(sender)
    started = time.monotonic()
    client.track_sync("Paid", user_id="u1", timeout=5)
    assert time.monotonic() - started >= 0.95  # the server asked for a second; the backoff is 10 ms
    assert len(sender.requests) == 2 and not errors
    client.shutdown(5)


def test_a_413_halves_the_batch_until_the_pieces_fit():
    def handler(request: MockRequest):
        return 413 if len(request.events) > 2 else None

    sender = MockSender(handler)
    client, errors = make_client(sender, max_batch_size=8)
    for n in range(8):
        client.track("Viewed", {"n": n}, user_id="u1")
    assert client.flush(5).unsent == 0
    delivered = [e["properties"]["n"] for r in sender.requests if len(r.events) <= 2 for e in r.events]
    assert sorted(delivered) == list(range(8)) and not errors
    assert client.stats()["sent"] == 8
    client.shutdown(5)


def test_a_permanent_refusal_reaches_on_error_once():
    sender = MockSender(lambda request: MockResponse(400, {"message": "bad batch"}))
    client, errors = make_client(sender)
    client.track("Viewed", user_id="u1")
    client.flush(5)
    assert len(sender.requests) == 1  # never retried
    [(error, events)] = errors
    assert error.status_code == 400 and "bad batch" in str(error)
    assert events[0]["event"] == "Viewed"
    stats = client.stats()
    assert stats["failed"] == 1 and conserved(stats)
    client.shutdown(5)


def test_a_partial_answer_reports_only_the_rejected_events():
    def handler(request: MockRequest):
        return MockResponse(200, {"status": "partial", "accepted": 1, "failed": 1,
                                  "errors": [{"index": 0, "message": "invalid userId"}]})

    sender = MockSender(handler)
    client, errors = make_client(sender)
    client.track("A", user_id="u1")
    client.track("B", user_id="u2")
    client.flush(5)
    [(error, events)] = errors
    assert [e["event"] for e in events] == ["A"] and "invalid userId" in str(error)
    stats = client.stats()
    assert stats["sent"] == 1 and stats["failed"] == 1 and conserved(stats)
    client.shutdown(5)


def test_a_network_failure_is_retried_then_reported():
    def handler(request: MockRequest):
        raise ConnectionResetError("peer reset")

    sender = MockSender(handler, retry_max_attempts=3, retry_initial_delay=10)
    client, errors = make_client(sender)
    client.track("A", user_id="u1")
    client.flush(5)
    assert len(sender.requests) == 3
    [(error, _)] = errors
    assert "3 attempts" in str(error) and "ConnectionResetError" in str(error)
    assert client.stats()["failed"] == 1
    client.shutdown(5)


def test_a_slow_answer_is_cut_by_the_deadline():
    sender = MockSender(lambda request: MockResponse(200, delay=30))
    client, _ = make_client(sender)
    started = time.monotonic()
    with pytest.raises(klime.SendError):
        client.track_sync("A", user_id="u1", timeout=0.3)
    assert time.monotonic() - started < 5  # the deadline, not the 30 s answer, ended it
    client.shutdown(0)

