"""The invocation transport (src/klime/transports/invocation.py) against the real local
collector: buffering without a thread, concurrent flushes over reused connections, events
kept when a deadline cuts a flush short, inline sends for handlers without the decorator,
and the one warning about events left over from an earlier invocation."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import klime
from conftest import Recorder, conserved
from klime import InvocationTransport
from klime._deadline import Deadline
from klime.devserver import Fault
from klime.testing import MockRequest, MockResponse, MockSender
from klime.transports import invocation as invocation_module

LEFTOVER_WARNING = "events recorded before this invocation were still waiting"


def invocation_client(make_client, **options):
    transport = InvocationTransport(
        flush_interval=options.pop("flush_interval", 2000),
        max_batch_size=options.pop("max_batch_size", 20),
        max_queue_size=options.pop("max_queue_size", 1000),
        max_concurrent_requests=options.pop("max_concurrent_requests", 4),
        inline_timeout=options.pop("inline_timeout", 2.0),
    )
    return make_client(transport=transport, **options), transport


def track(client, n, tag="t"):
    for i in range(n):
        client.track("Invocation Test", {"tag": tag, "i": i}, user_id=f"user-{i}")


def leftover_warnings(caplog):
    return [r for r in caplog.records if r.name == "klime" and LEFTOVER_WARNING in r.getMessage()]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    # "warn once" is per process; let each test see its own first warning.
    for key in ("invocation-leftovers", "invocation-overflow", "serverless-unsent"):
        klime._logging.log.reset_once(key)
    yield


def test_default_transport_on_serverless_platforms(monkeypatch):
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "fn")
    assert isinstance(klime.Client("k").transport, InvocationTransport)
    assert klime.Client("k", transport="background").transport.name == "background"
    monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME")
    monkeypatch.setenv("FUNCTION_TARGET", "fn")
    assert klime.Client("k").transport.name == "invocation"
    monkeypatch.delenv("FUNCTION_TARGET")
    assert klime.Client("k").transport.name == "background"


def klime_threads(before=()):
    """klime's sender/flush threads alive now that were not in ``before``."""
    names = ("klime-flush", "klime-sender")
    return [t for t in threading.enumerate() if t.name.startswith(names) and t not in before]


def test_buffers_without_a_thread_until_flush(make_client, collector):
    before = set(threading.enumerate())  # other tests' daemon threads may linger
    client, transport = invocation_client(make_client)
    transport.begin_invocation()
    track(client, 45)
    assert collector.requests() == []
    assert klime_threads(before) == []
    assert client.stats()["queued"] == 45 and conserved(client.stats())

    result = client.flush(timeout=5)

    assert (result.sent, result.unsent, result.timed_out) == (45, 0, False)
    assert len(collector.events()) == 45
    assert klime_threads(before) == [], "flush must leave no thread behind"
    assert client.stats()["queued"] == 0 and conserved(client.stats())


def test_flush_sends_batches_concurrently_and_keeps_order_within_batches(make_client, collector):
    client, transport = invocation_client(make_client, max_batch_size=10, max_concurrent_requests=4)
    transport.begin_invocation()
    collector.set_mode(Fault.slow(0.2))  # every request is held: batches must overlap
    peaks = []
    for round_ in range(2):
        collector.reset()
        collector.set_mode(Fault.slow(0.2))
        track(client, 80, tag=str(round_))
        result = client.flush(timeout=10)
        peaks.append(collector.peak_in_flight)

        assert result.sent == 80 and result.ok
        requests = [r for r in collector.requests() if r.status == 200]
        assert len(requests) == 8 and all(len(r.json()["batch"]) == 10 for r in requests)
        batches = sorted([e["properties"]["i"] for e in r.json()["batch"]] for r in requests)
        assert batches == [list(range(k, k + 10)) for k in range(0, 80, 10)]
    # The first flush learns (one request, then as many as the rest needs, up to the
    # ceiling of 4); the next one knows round trips are slow and starts 4 at once.
    assert peaks == [4, 4], peaks
    assert collector.connection_count() <= 4  # never more than max_concurrent_requests


def test_requests_that_are_all_cpu_are_sent_one_after_the_other(make_client):
    # Threads of one interpreter overlap only what a request spends off the CPU: a sender
    # whose every attempt is CPU work on its own thread gets no second request in flight.
    in_flight, most = [0], [0]
    lock = threading.Lock()

    def busy(request: MockRequest) -> MockResponse:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        until = time.thread_time() + 0.003
        while time.thread_time() < until:  # 3 ms of this thread's CPU, bounded
            pass
        with lock:
            in_flight[0] -= 1
        return MockResponse(200)

    before = set(threading.enumerate())
    client, transport = invocation_client(make_client, max_batch_size=10, sender=MockSender(busy))
    transport.begin_invocation()
    for _ in range(3):
        track(client, 80)
        assert client.flush(timeout=10).sent == 80
    assert most[0] == 1
    assert klime_threads(before) == []


def test_repeated_flushes_reuse_one_connection(make_client, collector):
    client, _ = invocation_client(make_client)
    for round_ in range(20):
        track(client, 3, tag=str(round_))
        assert client.flush(timeout=5).sent == 3
    assert len(collector.events()) == 60
    assert collector.connection_count() == 1


def test_deadline_keeps_unsent_events_for_the_next_flush(make_client, collector, on_error):
    client, transport = invocation_client(make_client, max_batch_size=10, on_error=on_error)
    transport.begin_invocation()
    track(client, 30, tag="first")
    collector.set_mode(Fault.blackhole())

    result = client.flush(timeout=0.3)

    assert result.timed_out and result.unsent == 30 and result.sent == 0 and result.failed == 0
    assert client.stats()["queued"] == 30 and conserved(client.stats())
    assert on_error.calls == [], "events the deadline kept are neither failed nor reported"

    collector.set_mode(None)
    track(client, 2, tag="second")
    result = client.flush(timeout=5)

    assert result.sent == 32 and result.ok
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 32
    # the kept events went first in line: they fill the first batches, in order
    accepted = [r for r in collector.requests() if r.status == 200]
    batches = [[e["properties"]["tag"] for e in r.json()["batch"]] for r in accepted]
    assert sorted(batches) == [["first"] * 10] * 3 + [["second"] * 2]
    assert conserved(client.stats()) and client.stats()["queued"] == 0


def test_flush_within_a_deadline_that_already_passed_sends_nothing(make_client, collector):
    client, transport = invocation_client(make_client)
    track(client, 3)
    transport._send(Deadline.after(0))
    assert collector.requests() == []
    assert client.stats()["queued"] == 3
    assert client.flush(timeout=5).sent == 3


def test_stale_connection_is_retried_at_once(make_client, collector):
    # A backoff would need 60 s; the flush has 5: only an immediate retry delivers.
    client, _ = invocation_client(make_client, retry_initial_delay=60_000)
    track(client, 1)
    assert client.flush(timeout=5).sent == 1
    collector.respond(Fault.reset_before_read())  # the pooled connection is dead on reuse

    track(client, 2, tag="after")
    result = client.flush(timeout=5)

    assert result.sent == 2 and result.ok
    assert client.stats()["retries"] == 1
    assert [r.fault for r in collector.requests()] == [None, "reset_before_read", None]


def test_full_batch_is_sent_inline_without_a_decorator(make_client, collector):
    client, _ = invocation_client(make_client, max_batch_size=5)
    track(client, 4)
    assert collector.requests() == []
    track(client, 1)  # the fifth event fills the batch: sent before track() returns
    assert len(collector.events()) == 5
    track(client, 7)
    assert len(collector.events()) == 10 and client.stats()["queued"] == 2


def test_under_a_decorator_events_wait_for_the_flush(make_client, collector):
    client, transport = invocation_client(make_client, max_batch_size=5, max_queue_size=50)
    transport.begin_invocation()
    track(client, 49)
    assert collector.requests() == []
    track(client, 1)  # max_queue_size reached: sent inline rather than dropped
    assert len(collector.events()) == 50
    assert client.stats()["dropped"] == 0 and conserved(client.stats())


def test_leftovers_are_sent_with_one_warning(make_client, collector, caplog_klime):
    client, _ = invocation_client(make_client, flush_interval=50)
    track(client, 2, tag="old")
    time.sleep(0.06)  # older than flush_interval: from an earlier invocation
    track(client, 1, tag="new")

    assert len(collector.events()) == 3
    assert len(leftover_warnings(caplog_klime)) == 1
    assert "@klime_lambda" in leftover_warnings(caplog_klime)[0].getMessage()

    track(client, 1, tag="old2")
    time.sleep(0.06)
    track(client, 1, tag="new2")
    assert len(collector.events()) == 5
    assert len(leftover_warnings(caplog_klime)) == 1, "the warning is logged once"


def test_lambda_invocation_marker_tells_invocations_apart(make_client, collector, caplog_klime, monkeypatch):
    # flush_interval is long: only the runtime's per-invocation trace id can tell.
    client, _ = invocation_client(make_client, flush_interval=60_000)
    monkeypatch.setenv(invocation_module.LAMBDA_TRACE_ENV, "Root=1-aaaa;Parent=1;Sampled=0")
    track(client, 3)
    assert collector.requests() == []
    monkeypatch.setenv(invocation_module.LAMBDA_TRACE_ENV, "Root=1-bbbb;Parent=2;Sampled=0")
    track(client, 1)
    assert len(collector.events()) == 4
    assert len(leftover_warnings(caplog_klime)) == 1


def test_same_lambda_invocation_is_never_stale(make_client, collector, caplog_klime, monkeypatch):
    client, _ = invocation_client(make_client, flush_interval=1)
    monkeypatch.setenv(invocation_module.LAMBDA_TRACE_ENV, "Root=1-cccc;Parent=1;Sampled=0")
    track(client, 1)
    time.sleep(0.01)  # ten flush_intervals, but the same invocation
    track(client, 1)
    assert collector.requests() == []
    assert leftover_warnings(caplog_klime) == []


def test_decorated_transport_does_not_warn(make_client, collector, caplog_klime):
    client, transport = invocation_client(make_client, flush_interval=1)
    transport.begin_invocation()
    track(client, 1)
    time.sleep(0.01)
    track(client, 1)
    assert collector.requests() == [] and leftover_warnings(caplog_klime) == []


def test_inline_send_is_bounded_then_paused(make_client, collector, caplog_klime):
    client, _ = invocation_client(make_client, max_batch_size=5, inline_timeout=0.2)
    collector.set_mode(Fault.blackhole())
    track(client, 5)  # returns once inline_timeout has passed; the batch stays buffered
    assert client.stats()["queued"] == 5 and client.stats()["sent"] == 0
    requests = len(collector.requests())
    assert requests == 1

    track(client, 5)  # paused: no new attempt, no new stall
    assert len(collector.requests()) == requests
    assert any("inline sending pauses" in r.getMessage() for r in caplog_klime.records)

    collector.set_mode(None)
    assert client.flush(timeout=5).sent == 10  # an explicit flush ignores the pause
    assert len(set(collector.message_ids())) == 10


def test_inline_send_under_a_decorator_stops_at_the_invocation_deadline(make_client, collector):
    client, transport = invocation_client(make_client, max_batch_size=5, max_queue_size=5, inline_timeout=30)
    transport.begin_invocation()
    collector.set_mode(Fault.blackhole())
    token = invocation_module.enter_invocation(Deadline.after(0.2))
    try:
        assert invocation_module.invocation_deadline() is not None
        track(client, 5)  # would wait 30 s without the invocation's deadline
    finally:
        invocation_module.exit_invocation(token)
    assert invocation_module.invocation_deadline() is None
    assert client.stats()["queued"] == 5
    collector.set_mode(None)
    assert client.flush(timeout=5).sent == 5


def test_overflow_drops_the_oldest_and_reports_them(make_client, collector):
    on_error = Recorder()
    # max_batch_size above max_queue_size: nothing is sent inline, the buffer overflows
    client, _ = invocation_client(make_client, max_batch_size=10, max_queue_size=4, on_error=on_error)
    track(client, 7)
    stats = client.stats()
    assert stats["queued"] == 7 and conserved(stats)  # dropped ones wait to be reported

    result = client.flush(timeout=5)

    assert (result.dropped, result.sent) == (3, 4)
    assert [e["properties"]["i"] for e in on_error.events] == [0, 1, 2]
    assert [e["properties"]["i"] for e in collector.events()] == [3, 4, 5, 6]
    assert client.stats()["dropped"] == 3 and conserved(client.stats())


def test_shutdown_flushes_then_refuses(make_client, collector, on_error):
    client, _ = invocation_client(make_client, on_error=on_error)
    track(client, 3)
    client.shutdown(timeout=5)
    assert len(collector.events()) == 3
    track(client, 1)
    assert client.stats()["tracked"] == 3 and conserved(client.stats())


def test_shutdown_without_flush_reports_what_was_buffered(make_client, collector, on_error):
    client, _ = invocation_client(make_client, on_error=on_error, flush_on_shutdown=False)
    track(client, 3)
    client.shutdown(timeout=5)
    assert collector.requests() == []
    assert len(on_error.events) == 3
    assert client.stats()["dropped"] == 3 and conserved(client.stats())


def test_after_fork_forgets_the_parents_events(make_client, collector):
    client, transport = invocation_client(make_client)
    track(client, 3)
    transport.after_fork()
    assert transport.counts() == {"accepted": 0, "pending": 0}
    track(client, 1)
    assert client.flush(timeout=5).sent == 1


def test_concurrent_tracking_and_flushing_conserves_every_event(make_client, collector):
    client, _ = invocation_client(make_client, max_batch_size=7)
    stop = threading.Event()

    def flusher():
        while not stop.is_set():
            client.flush(timeout=5)

    threads = [threading.Thread(target=track, args=(client, 200, f"t{n}")) for n in range(4)]
    flushing = threading.Thread(target=flusher)
    flushing.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    flushing.join()
    client.flush(timeout=5)

    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 800
    stats = client.stats()
    assert stats["sent"] == 800 and stats["queued"] == 0 and conserved(stats)


def test_logging_is_quiet_on_success(make_client, collector, caplog):
    caplog.set_level(logging.INFO, logger="klime")
    client, _ = invocation_client(make_client)
    track(client, 45)
    client.flush(timeout=5)
    assert [r for r in caplog.records if r.name == "klime"] == []


def test_a_flush_takes_deferred_batches_first_and_hands_back_what_it_left():
    """KnownBatches, the small queue a flush drains: within the limit, a deferred batch goes
    before the waiting ones; what the drain left comes back deferred first, then untaken."""
    from klime._retry import Retry
    from klime.transports._flights import Flights
    from klime.transports.invocation import KnownBatches

    flights = Flights(threading.Lock(), ceiling=4, name="test-flush", grow_at_once=True)
    known = KnownBatches([[b"a1", b"a2"], [b"b1"], [b"c1"]], flights, delivery=None)  # no send here
    with flights.lock:
        assert flights.limit.limit == 1 and known.takeable_locked() == 1
        first = known.take_locked()
        assert first is not None and first.events == [b"a1", b"a2"]
        assert known.take_locked() is None, "one in the air: the limit is full"
        flights.settle_locked(first, [b"a2"], Retry(1), "HTTP 503")  # a2 came back, deferred
        again = known.take_locked()
        assert again is not None and again.events == [b"a2"] and again.attempts == 1
        flights.settle_locked(again, [b"a2"], Retry(2), "HTTP 503")
        assert known.leftover_locked() == [b"a2", b"b1", b"c1"]
        assert known.take_locked() is None and not flights.flying and not flights.deferred
