"""Every fault the local collector can inject, end to end through a real ``klime.Client``.

Each fault runs through three paths: the ``background`` transport (one batch, sent by the
worker thread and awaited with ``flush``), the ``blocking`` transport (``track`` sends on the
caller's thread) and ``track_sync`` (raises ``SendError``). After each run the books are
reconciled event by event (every event carries a unique ``seq`` property): the client's
counters, what the collector accepted, what ``on_error`` (or ``SendError``) got, and the
``messageId`` of every copy of every event in every request, retries included.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Set, Tuple

import pytest

import klime
from conftest import WRITE_KEY, conserved, wait_until
from klime import SendError
from klime.devserver import FAULT_KINDS, Collector, Fault
from klime.senders.http import HttpSender

MODES = ("background", "blocking", "sync")
#: Generous bound for "returns within its timeout" on a loaded 2-core machine.
SLACK = 1.5
#: How long a test waits for an outcome that should come at once.
SETTLE = 10.0


@dataclass
class Ledger:
    """What ``on_error`` received and what ``track_sync`` raised, in order."""

    reported: List[Tuple[SendError, List[Dict[str, Any]]]] = field(default_factory=list)
    raised: List[SendError] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_error(self, error: SendError, events: List[Dict[str, Any]]) -> None:
        with self.lock:
            self.reported.append((error, events))

    def errors(self) -> List[SendError]:
        return [e for e, _ in self.reported] + list(self.raised)

    def failed_events(self) -> List[Dict[str, Any]]:
        return [ev for _, evs in self.reported for ev in evs] + [ev for e in self.raised for ev in e.events]


def new_client(
    make_client: Callable[..., klime.Client], mode: str, ledger: Ledger, **options: Any
) -> klime.Client:
    options.setdefault("on_error", ledger.on_error)
    if mode == "background":
        options.setdefault("flush_interval", 60_000)  # nothing leaves before flush(): one batch
        options.setdefault("max_batch_size", 100)
        return make_client(transport="background", **options)
    return make_client(transport="blocking", **options)


def short_timeout_sender(collector: Collector, read_timeout: float = 0.3, **kw: Any) -> HttpSender:
    kw.setdefault("retry_initial_delay", 10)
    return HttpSender(WRITE_KEY, collector.url, read_timeout=read_timeout, **kw)


def deliver(client: klime.Client, mode: str, ledger: Ledger, n: int, *, first: int = 0) -> None:
    """Track events ``first .. first+n-1`` and wait until each is resolved."""
    for seq in range(first, first + n):
        if mode == "sync":
            try:
                client.track_sync("Fault Test", {"seq": seq}, user_id=f"user-{seq}")
            except SendError as exc:
                ledger.raised.append(exc)
        else:
            client.track("Fault Test", {"seq": seq}, user_id=f"user-{seq}")
    if mode == "background":
        result = client.flush(timeout=SETTLE)
        assert result.unsent == 0 and not result.timed_out, result


def batches(collector: Collector) -> List[List[Dict[str, Any]]]:
    """The events of every request that carried a body, in arrival order."""
    return [r.json()["batch"] for r in collector.requests() if r.body]


@dataclass
class Books:
    accepted: Counter  # seq -> copies accepted by the collector
    reported: Counter  # seq -> times handed to on_error or raised in SendError
    stats: Dict[str, int]


def reconcile(
    client: klime.Client,
    collector: Collector,
    ledger: Ledger,
    n: int,
    *,
    ambiguous: Set[int] = frozenset(),  # type: ignore[assignment]
) -> Books:
    """Check the conservation law event by event; return the books for further checks.

    ``ambiguous`` are the seqs whose request may have been processed although the client
    saw a failure (a response that never came back in time): only those may be accepted
    twice, or both accepted and reported.
    """
    stats = client.stats()
    assert stats["tracked"] == n, stats
    assert stats["queued"] == 0 and conserved(stats), stats
    accepted = Counter(e["properties"]["seq"] for e in collector.events())
    reported = Counter(e["properties"]["seq"] for e in ledger.failed_events())
    # One messageId per event, wherever a copy of it was seen (retries carry the same one).
    ids: Dict[int, Set[str]] = defaultdict(set)
    for batch in batches(collector):
        for event in batch:
            ids[event["properties"]["seq"]].add(event["messageId"])
    for event in ledger.failed_events():
        ids[event["properties"]["seq"]].add(event["messageId"])
    assert {seq: mids for seq, mids in ids.items() if len(mids) != 1} == {}
    assert set(accepted) | set(reported) == set(range(n)), "an event vanished"
    assert max(reported.values(), default=0) <= 1, "an event was reported twice"
    for seq in range(n):
        if seq not in ambiguous:
            assert accepted[seq] + reported[seq] == 1, (seq, accepted[seq], reported[seq])
    assert stats["sent"] == sum(1 for s in range(n) if accepted[s] and not reported[s]), stats
    assert stats["failed"] + stats["dropped"] == sum(reported.values()), stats
    return Books(accepted, reported, stats)


def request_sizes(collector: Collector) -> List[int]:
    return [len(b) for b in batches(collector)]


# ---------------------------------------------------------------------------------------
# transient statuses: retried with the same bytes, delivered once


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_status_is_retried_with_the_same_message_ids(make_client, collector, mode, status):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(Fault.status_code(status), Fault.status_code(status))
    n = 4
    deliver(client, mode, ledger, n)
    books = reconcile(client, collector, ledger, n)
    assert books.stats["sent"] == n and not ledger.errors()
    assert books.stats["retries"] == 2 and books.stats["requests"] == 2 + (1 if mode == "background" else n)
    first, second, third = collector.requests()[:3]
    assert first.status == second.status == status and third.status == 200
    assert first.body == second.body == third.body  # the very same bytes each time
    assert sorted(books.accepted.values()) == [1] * n


@pytest.mark.parametrize("mode", MODES)
def test_transient_status_until_attempts_run_out_is_reported_once(make_client, collector, mode):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger, retry_max_attempts=3)
    collector.set_mode(Fault.status_code(503))
    n = 3
    deliver(client, mode, ledger, n)
    books = reconcile(client, collector, ledger, n)
    assert books.stats["failed"] == n and books.stats["sent"] == 0
    assert books.stats["requests"] == 3 * (1 if mode == "background" else n)
    errors = ledger.errors()
    assert all(e.status_code == 503 and e.retryable and "3 attempts" in e.message for e in errors)
    if mode == "sync":
        assert not ledger.reported, "track_sync raises instead of calling on_error"
    # every attempt carried the same messageIds as what was finally reported
    sent_ids = {ev["messageId"] for batch in batches(collector) for ev in batch}
    assert sent_ids == {ev["messageId"] for ev in ledger.failed_events()}


# ---------------------------------------------------------------------------------------
# permanent statuses: one attempt, reported


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_status_is_reported_without_retry(make_client, collector, mode, status):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(Fault.status_code(status))
    n = 3
    deliver(client, mode, ledger, n)
    books = reconcile(client, collector, ledger, n)
    failed = n if mode == "background" else 1
    assert books.stats["failed"] == failed and books.stats["retries"] == 0
    (error,) = ledger.errors()
    assert error.status_code == status and not error.retryable and len(error.events) == failed


# ---------------------------------------------------------------------------------------
# 413: split in half and retried, down to single events; a single event is reported


def test_413_halves_down_to_single_events_and_reports_each(make_client, collector):
    ledger = Ledger()
    client = new_client(make_client, "background", ledger)
    collector.set_mode(Fault.status_code(413))
    n = 8
    deliver(client, "background", ledger, n)
    books = reconcile(client, collector, ledger, n)
    # depth first: 8 -> 4 -> 2 -> 1, 1 -> 2 -> 1, 1 -> 4 -> ...
    assert request_sizes(collector) == [8, 4, 2, 1, 1, 2, 1, 1, 4, 2, 1, 1, 2, 1, 1]
    assert books.stats["failed"] == n and books.stats["requests"] == 15
    assert len(ledger.reported) == n, "each single event is reported on its own"
    for error, events in ledger.reported:
        assert error.status_code == 413 and len(events) == 1 and "too large" in error.message
    assert [evs[0]["properties"]["seq"] for _, evs in ledger.reported] == list(range(n))  # order kept


def test_413_halving_delivers_every_half_that_fits(make_client, collector):
    ledger = Ledger()
    client = new_client(make_client, "background", ledger)
    collector.respond(Fault.status_code(413), Fault.status_code(413))
    n = 8
    deliver(client, "background", ledger, n)
    books = reconcile(client, collector, ledger, n)
    assert request_sizes(collector) == [8, 4, 2, 2, 4]
    assert books.stats["sent"] == n and not ledger.errors()
    assert [e["properties"]["seq"] for e in collector.events()] == list(range(n))


@pytest.mark.parametrize("mode", ["blocking", "sync"])
def test_413_on_a_single_event_is_reported_at_once(make_client, collector, mode):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(Fault.status_code(413))
    deliver(client, mode, ledger, 2)
    books = reconcile(client, collector, ledger, 2)
    assert books.reported == Counter({0: 1}) and books.accepted == Counter({1: 1})
    assert ledger.errors()[0].status_code == 413 and books.stats["requests"] == 2


# ---------------------------------------------------------------------------------------
# 2xx variants


@pytest.mark.parametrize("mode", MODES)
def test_partial_failure_reports_the_failed_and_never_resends_the_accepted(make_client, collector, mode):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    n = 5
    if mode == "background":
        collector.respond(Fault.partial(1, 3))
        expected_failed = {1, 3}
    else:
        collector.respond(Fault.partial(0))  # each request holds one event: fail the first
        expected_failed = {0}
    deliver(client, mode, ledger, n)
    books = reconcile(client, collector, ledger, n)
    assert set(books.reported) == expected_failed
    assert books.stats["retries"] == 0 and books.stats["requests"] == (1 if mode == "background" else n)
    error = ledger.errors()[0]
    assert error.response is not None and error.response.failed == len(expected_failed)
    assert error.status_code == 200 and not error.retryable


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "fault",
    [
        Fault.non_json_200(),
        Fault.non_json_200(b"<html>not json</html>"),
        Fault.unexpected_200(),
        Fault.unexpected_200(b'{"status": 7, "accepted": "many", "errors": "none"}'),
        Fault.unexpected_200(b'{"errors": [{"index": "0"}, {"index": 99}, 5, null]}'),
        Fault.unexpected_200(b"[]"),
    ],
    ids=["text", "html", "extra-fields", "wrong-types", "bad-errors", "json-list"],
)
def test_odd_2xx_bodies_count_as_accepted(make_client, collector, mode, fault):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(fault)
    deliver(client, mode, ledger, 3)
    books = reconcile(client, collector, ledger, 3)
    assert books.stats["sent"] == 3 and not ledger.errors() and books.stats["retries"] == 0


# ---------------------------------------------------------------------------------------
# connection-level faults


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [Fault.reset_before_read(), Fault.reset_after_read()], ids=lambda f: f.kind)
def test_connection_reset_is_retried_with_the_same_message_ids(make_client, collector, mode, fault):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(fault, fault)
    n = 3
    deliver(client, mode, ledger, n)
    books = reconcile(client, collector, ledger, n)
    assert books.stats["sent"] == n and not ledger.errors()
    assert books.stats["retries"] == 2
    reqs = collector.requests()
    assert [r.fault for r in reqs[:3]] == [fault.kind, fault.kind, None]
    if fault.kind == "reset_after_read":  # the server read the body both times
        assert reqs[0].body == reqs[1].body == reqs[2].body


@pytest.mark.parametrize("mode", MODES)
def test_read_timeout_on_a_black_hole_is_retried(make_client, collector, mode):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger, sender=short_timeout_sender(collector))
    collector.respond(Fault.blackhole())
    n = 2
    deliver(client, mode, ledger, n)
    books = reconcile(client, collector, ledger, n)
    assert books.stats["sent"] == n and books.stats["retries"] == 1
    first, second = collector.requests()[:2]
    assert first.fault == "blackhole" and first.body == second.body


@pytest.mark.parametrize("mode", MODES)
def test_black_hole_until_attempts_run_out_is_reported(make_client, collector, mode):
    ledger = Ledger()
    sender = short_timeout_sender(collector, read_timeout=0.2, retry_max_attempts=2)
    client = new_client(make_client, mode, ledger, sender=sender)
    collector.set_mode(Fault.blackhole())
    deliver(client, mode, ledger, 1)
    books = reconcile(client, collector, ledger, 1)
    (error,) = ledger.errors()
    assert books.stats["failed"] == 1 and "read timed out" in error.message and error.retryable


def test_black_hole_flush_and_shutdown_return_within_their_timeouts(make_client, collector):
    """The default client (10 s read timeout, 5 attempts) against an endpoint that never
    answers: flush and shutdown still return on time and account for every event."""
    ledger = Ledger()
    client = make_client(on_error=ledger.on_error, flush_interval=50)
    collector.set_mode(Fault.blackhole())
    for seq in range(30):
        client.track("Fault Test", {"seq": seq}, user_id="u")
    assert collector.wait_for_requests(1, timeout=SETTLE)
    start = time.monotonic()
    flushed = client.flush(timeout=0.3)
    assert time.monotonic() - start < 0.3 + SLACK
    assert flushed.timed_out and flushed.unsent == 30
    start = time.monotonic()
    result = client.shutdown(timeout=0.3)
    assert time.monotonic() - start < 0.3 + SLACK
    assert result.timed_out and result.failed + result.dropped == 30
    books = reconcile(client, collector, ledger, 30)
    assert books.stats["sent"] == 0
    reasons = {e.message for e in ledger.errors()}
    assert any("being sent" in r for r in reasons) and any("before the event was sent" in r for r in reasons)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fault", [Fault.slow(0.05), Fault.drip(0.002)], ids=lambda f: f.kind)
def test_slow_and_dripping_answers_are_accepted(make_client, collector, mode, fault):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.set_mode(fault)
    deliver(client, mode, ledger, 3)
    books = reconcile(client, collector, ledger, 3)
    assert books.stats["sent"] == 3 and books.stats["retries"] == 0 and not ledger.errors()


@pytest.mark.parametrize("mode", MODES)
def test_an_answer_slower_than_the_read_timeout_is_the_ambiguous_case(make_client, collector, mode):
    """The server accepted the batch but its answer came after the client gave up: the
    client cannot know, retries with the same messageIds, and the server sees the event
    twice. That duplicate is the one the messageId exists to collapse."""
    ledger = Ledger()
    client = new_client(make_client, mode, ledger, sender=short_timeout_sender(collector, read_timeout=0.2))
    collector.respond(Fault.slow(0.6))
    deliver(client, mode, ledger, 1)
    books = reconcile(client, collector, ledger, 1, ambiguous={0})
    assert books.accepted == Counter({0: 2}) and books.stats["sent"] == 1 and not ledger.errors()
    first, second = collector.message_ids()
    assert first == second


# ---------------------------------------------------------------------------------------
# Retry-After


def _gap(collector: Collector) -> float:
    first, second = collector.requests()[:2]
    return second.received_at - first.received_at


@pytest.mark.parametrize("mode", MODES)
def test_retry_after_in_seconds_is_waited_for(make_client, collector, mode):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(Fault.retry(429, retry_after="1"))
    deliver(client, mode, ledger, 1)
    reconcile(client, collector, ledger, 1)
    assert _gap(collector) >= 0.9  # backoff alone would have been ~10 ms


@pytest.mark.parametrize("mode", MODES)
def test_retry_after_as_an_http_date_is_waited_for(make_client, collector, mode):
    ledger = Ledger()
    client = new_client(make_client, mode, ledger)
    collector.respond(Fault.retry(503, retry_after=email.utils.formatdate(time.time() + 2, usegmt=True)))
    deliver(client, mode, ledger, 1)
    reconcile(client, collector, ledger, 1)
    assert _gap(collector) >= 0.9  # the date has 1 s resolution: at least ~1 s after "now + 2"


def test_retry_after_longer_than_the_flush_timeout(make_client, collector):
    """A Retry-After of 30 s never holds flush or shutdown past their timeouts."""
    ledger = Ledger()
    client = new_client(make_client, "background", ledger)
    collector.respond(Fault.retry(429, retry_after="30"))
    client.track("Fault Test", {"seq": 0}, user_id="u")
    start = time.monotonic()
    assert client.flush(timeout=0.3).unsent == 1
    assert time.monotonic() - start < 0.3 + SLACK
    start = time.monotonic()
    result = client.shutdown(timeout=0.3)
    assert time.monotonic() - start < 0.3 + SLACK
    assert result.failed + result.dropped == 1
    # Counted by the time shutdown returns; handed to on_error by the sender thread whose
    # retry the deadline cut short, which may finish just after (seen without the GIL).
    assert wait_until(lambda: len(ledger.failed_events()) == 1, 5)
    reconcile(client, collector, ledger, 1)
    assert "deadline" in ledger.errors()[0].message or "shutdown" in ledger.errors()[0].message


def test_retry_after_with_track_sync_timeout_raises_at_the_deadline(make_client, collector):
    ledger = Ledger()
    client = new_client(make_client, "sync", ledger)
    collector.respond(Fault.retry(503, retry_after="30"))
    start = time.monotonic()
    with pytest.raises(SendError) as info:
        client.track_sync("Fault Test", {"seq": 0}, user_id="u", timeout=0.3)
    assert time.monotonic() - start < 0.3 + SLACK
    assert info.value.status_code == 503 and info.value.retryable
    ledger.raised.append(info.value)
    reconcile(client, collector, ledger, 1)


# ---------------------------------------------------------------------------------------
# seeded random schedules


def _random_run(
    make_client: Callable[..., klime.Client], collector: Collector, seed: int
) -> Tuple[List[Any], Books]:
    ledger = Ledger()
    client = new_client(make_client, "blocking", ledger, retry_max_attempts=3)
    collector.reset()
    collector.set_random_faults(
        seed,
        {
            "500": 0.15,
            "429": 0.1,
            "408": 0.05,
            "400": 0.05,
            "413": 0.05,
            "partial:0": 0.05,
            "non_json_200": 0.05,
            "unexpected_200": 0.05,
            "reset_before_read": 0.1,
            "reset_after_read": 0.1,
            "slow:0.01": 0.05,
            "drip:0.001": 0.05,
        },
    )
    deliver(client, "blocking", ledger, 40)
    books = reconcile(client, collector, ledger, 40)
    schedule = [(r.fault, len(r.json()["batch"]) if r.body else None) for r in collector.requests()]
    client.shutdown(timeout=2)
    return schedule, books


def test_seeded_random_faults_replay_exactly_and_the_books_balance(make_client, collector):
    first, books = _random_run(make_client, collector, seed=7)
    again, books_again = _random_run(make_client, collector, seed=7)
    assert first == again, "the same seed gives the same faults in the same order"
    assert books.stats == books_again.stats
    assert books.stats["failed"] > 0 and books.stats["sent"] > 0 and books.stats["retries"] > 0
    assert len({fault for fault, _ in first}) >= 8, "the schedule exercised most fault kinds"


def test_every_fault_kind_is_exercised_here():
    """A new fault kind in the collector must get an end-to-end test in this file."""
    covered = {"status", "partial", "non_json_200", "unexpected_200", "reset_before_read",
               "reset_after_read", "blackhole", "slow", "drip"}  # fmt: skip
    assert covered == set(FAULT_KINDS)


def test_on_error_payload_is_the_wire_json(make_client, collector):
    """What on_error receives is exactly what was (or would have been) on the wire."""
    ledger = Ledger()
    client = new_client(make_client, "background", ledger)
    collector.respond(Fault.status_code(400))
    deliver(client, "background", ledger, 3)
    reconcile(client, collector, ledger, 3)
    (request,) = collector.requests()
    assert request.json()["batch"] == ledger.reported[0][1]
    assert json.loads(json.dumps(ledger.reported[0][1])) == ledger.reported[0][1]


@pytest.mark.parametrize("mode", ["background", "blocking"])
def test_stats_read_inside_a_callback_add_up(make_client, collector, mode):
    seen: List[Dict[str, int]] = []
    box: Dict[str, klime.Client] = {}

    def look(*args: Any) -> None:
        seen.append(box["client"].stats())

    ledger = Ledger()
    client = new_client(make_client, mode, ledger, on_success=look, on_error=look)
    box["client"] = client
    deliver(client, mode, ledger, 3)
    collector.respond(Fault.status_code(400))
    deliver(client, mode, ledger, 1, first=3)
    assert seen and all(conserved(s) for s in seen), seen
