"""klime.transports.background: the default transport, over real sockets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import klime
from conftest import WRITE_KEY, Recorder, conserved, wait_until
from klime.devserver import Fault
from klime.transports.background import BackgroundTransport


def sender_threads():
    return [t for t in threading.enumerate() if t.name == "klime-sender"]


def test_thread_starts_lazily_on_first_event(make_client, collector):
    before = len(sender_threads())
    client = make_client()
    assert len(sender_threads()) == before
    client.track("E", user_id="u")
    assert wait_until(lambda: len(sender_threads()) == before + 1, 2)
    assert all(t.daemon for t in sender_threads())


def test_interval_flush_without_calling_flush(make_client, collector):
    client = make_client(flush_interval=100)
    start = time.monotonic()
    client.track("E", user_id="u")
    assert collector.wait_for_events(1, timeout=5)
    assert time.monotonic() - start >= 0.05  # waited for the interval, not sent at once
    assert conserved(client.stats())


def test_size_triggered_flush_does_not_wait_for_the_interval(make_client, collector):
    client = make_client(flush_interval=60_000, max_batch_size=10)
    for i in range(10):
        client.track("E", {"i": i}, user_id="u")
    assert collector.wait_for_events(10, timeout=5)
    (req,) = collector.requests()
    assert len(req.json()["batch"]) == 10


def test_partial_batch_waits_for_the_interval(make_client, collector):
    client = make_client(flush_interval=60_000, max_batch_size=10)
    for i in range(15):
        client.track("E", {"i": i}, user_id="u")
    assert collector.wait_for_events(10, timeout=5)
    assert not collector.wait_for_events(11, timeout=0.3)  # the tail of 5 waits (interval 60 s)
    assert client.flush(timeout=5).unsent == 0
    assert len(collector.events()) == 15


def test_backlog_is_drained_back_to_back(make_client, collector):
    collector.set_mode(Fault.slow(0.3))
    client = make_client(flush_interval=60_000, max_batch_size=10, max_queue_size=1000)
    for i in range(10):
        client.track("E", {"i": i}, user_id="u")
    assert collector.wait_for_requests(1, timeout=5)  # the first batch is being answered slowly
    for i in range(10, 50):
        client.track("E", {"i": i}, user_id="u")  # 4 full batches pile up meanwhile
    collector.set_mode(None)
    assert collector.wait_for_events(50, timeout=5)  # no 60 s interval waits between them
    sizes = [len(r.json()["batch"]) for r in collector.requests()]
    assert sizes == [10] * 5
    # several batches may be in flight at once: order holds within a batch, not across
    batches = sorted([e["properties"]["i"] for e in r.json()["batch"]] for r in collector.requests())
    assert batches == [list(range(k, k + 10)) for k in range(0, 50, 10)]


def test_overflow_drops_the_oldest_counts_and_reports_in_batches(make_client, collector, caplog_klime):
    collector.set_mode(Fault.blackhole())
    on_error = Recorder()
    client = make_client(max_queue_size=100, max_batch_size=10, on_error=on_error, flush_interval=60_000)
    for i in range(10):
        client.track("E", {"i": i}, user_id="u")
    assert collector.wait_for_requests(1, timeout=5)  # batch 0..9 is in flight, stuck
    for i in range(10, 1110):  # 1,100 more into a queue of 100
        client.track("E", {"i": i}, user_id="u")
    stats = client.stats()  # counted the moment they were dropped
    assert stats["dropped"] == 1000 and stats["tracked"] == 1110
    assert stats["queued"] == 110 and conserved(stats)
    # reported by the sender thread once it is free again (here: when the black hole lets go)
    collector.set_mode(None)
    assert wait_until(lambda: len(on_error.events) == 1000, 15)
    dropped = sorted(e["properties"]["i"] for e in on_error.events)
    assert dropped == list(range(10, 1010))  # exactly the oldest queued ones
    assert len(on_error.calls) < 1000  # reported in batches, not one call per event
    warnings = [r for r in caplog_klime.records if "queue is full" in r.getMessage()]
    assert len(warnings) == 1  # one warning per episode
    result = client.shutdown(timeout=10)
    stats = client.stats()
    assert stats["queued"] == 0 and conserved(stats), (stats, result)
    arrived = sorted(e["properties"]["i"] for e in collector.events())
    assert arrived == list(range(10)) + list(range(1010, 1110))  # the in-flight batch was retried


def test_flush_waits_for_everything_queued_before_it(make_client, collector):
    client = make_client(flush_interval=60_000, max_batch_size=7)
    for i in range(100):
        client.track("E", {"i": i}, user_id="u")
    result = client.flush(timeout=10)
    assert result.unsent == 0 and not result.timed_out
    assert len(collector.events()) == 100
    stats = client.stats()
    assert stats["sent"] == 100 and stats["queued"] == 0 and conserved(stats)


def test_flush_deadline_against_a_black_hole(make_client, collector):
    collector.set_mode(Fault.blackhole())
    client = make_client(flush_interval=60_000)
    for _ in range(5):
        client.track("E", user_id="u")
    start = time.monotonic()
    result = client.flush(timeout=0.5)
    elapsed = time.monotonic() - start
    assert elapsed <= 0.5 + 0.25
    assert result.unsent == 5 and result.timed_out
    assert conserved(client.stats())


def test_shutdown_deadline_against_a_black_hole(make_client, collector):
    collector.set_mode(Fault.blackhole())
    on_error = Recorder()
    client = make_client(on_error=on_error, flush_interval=60_000, max_batch_size=5)
    for _ in range(12):
        client.track("E", user_id="u")
    start = time.monotonic()
    result = client.shutdown(timeout=0.5)
    assert time.monotonic() - start <= 0.5 + 0.25
    stats = client.stats()
    assert stats["queued"] == 0 and stats["failed"] + stats["dropped"] == 12 and conserved(stats)
    assert len(on_error.events) == 12 and result.timed_out


def test_shutdown_cuts_a_backoff_sleep_short(make_client, collector):
    collector.set_mode(Fault.status_code(503))
    client = make_client(retry_initial_delay=10_000, retry_max_attempts=5, flush_interval=10)
    client.track("E", user_id="u")
    assert collector.wait_for_requests(1, timeout=5)  # now sleeping ~10 s before the retry
    start = time.monotonic()
    client.shutdown(timeout=0.3)
    assert time.monotonic() - start <= 0.3 + 0.25
    stats = client.stats()
    assert stats["failed"] == 1 and stats["queued"] == 0 and conserved(stats)


def test_shutdown_without_flush_reports_what_was_queued(make_client, collector):
    on_error = Recorder()
    client = make_client(flush_on_shutdown=False, on_error=on_error, flush_interval=60_000)
    for _ in range(3):
        client.track("E", user_id="u")
    client.shutdown(timeout=1)
    assert len(on_error.events) == 3 and "flush_on_shutdown=False" in on_error.calls[0][0].message
    stats = client.stats()
    assert stats["dropped"] == 3 and conserved(stats)
    assert collector.events() == []


def test_callbacks_raising_do_not_kill_the_thread(make_client, collector):
    def boom(*_):
        raise RuntimeError("user bug")

    client = make_client(on_error=boom, on_success=boom, flush_interval=20)
    collector.respond(Fault.status_code(400))
    client.track("bad", user_id="u")
    assert wait_until(lambda: client.stats()["failed"] == 1, 5)
    client.track("good", user_id="u")
    assert collector.wait_for_events(1, timeout=5)
    assert client.flush(timeout=5).unsent == 0
    assert [t.is_alive() for t in sender_threads()]


def test_retries_are_counted(make_client, collector):
    collector.respond(Fault.status_code(500), Fault.status_code(502))
    client = make_client(flush_interval=20)
    client.track("E", user_id="u")
    client.flush(timeout=5)
    stats = client.stats()
    assert stats["retries"] == 2 and stats["requests"] == 3 and stats["sent"] == 1


#: The storms' size; the test matrix scales them up on free-threaded builds.
STORM_EVENTS = int(os.environ.get("KLIME_STORM_EVENTS", "5000"))  # per thread
STORM_THREADS = int(os.environ.get("KLIME_STORM_THREADS", "8"))


def test_eight_thread_storm_delivers_every_event_exactly_once(make_client, collector):
    per_thread, threads = STORM_EVENTS, STORM_THREADS
    client = make_client(max_batch_size=100, max_queue_size=per_thread * threads + 10, flush_interval=50)
    barrier = threading.Barrier(threads)

    def produce(t):
        barrier.wait()
        for i in range(per_thread):
            client.track("Storm", {"t": t, "i": i}, user_id=f"user_{i % 1000}")

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    result = client.flush(timeout=60)
    total = per_thread * threads
    assert result.unsent == 0
    ids = collector.message_ids()
    assert len(ids) == total and len(set(ids)) == total
    stats = client.stats()
    assert stats["tracked"] == stats["sent"] == total and conserved(stats)
    seen = {(e["properties"]["t"], e["properties"]["i"]) for e in collector.events()}
    assert len(seen) == total


def test_the_transport_accepts_a_custom_instance(collector):
    transport = BackgroundTransport(flush_interval=50, max_batch_size=3)
    client = klime.Client(WRITE_KEY, endpoint=collector.url, transport=transport)
    try:
        assert client.transport is transport
        for _ in range(3):
            client.track("E", user_id="u")
        assert collector.wait_for_events(3, timeout=5)
    finally:
        client.shutdown(timeout=2)


def test_inline_mode_without_threads(collector):
    transport = BackgroundTransport(flush_interval=60_000, max_batch_size=5, threads=False)
    before = len(sender_threads())
    client = klime.Client(WRITE_KEY, endpoint=collector.url, transport=transport)
    try:
        for _ in range(5):
            client.track("E", user_id="u")
        assert len(collector.events()) == 5  # sent on the caller's thread when the batch filled
        client.track("E", user_id="u")
        assert client.flush(timeout=5).unsent == 0
        assert len(collector.events()) == 6
        assert len(sender_threads()) == before
    finally:
        client.shutdown(timeout=2)


# --------------------------------------------------------------------------- process exit

EXIT_SCRIPT = """
import sys, klime
client = klime.Client({key!r}, endpoint={url!r}, flush_interval=60_000, exit_timeout={exit_timeout})
for i in range(25):
    client.track("AtExit", {{"i": i}}, user_id="u")
{ending}
"""


@pytest.mark.parametrize(
    "ending, code",
    [
        ("pass", 0),
        ("sys.exit(3)", 3),
        ("raise RuntimeError('uncaught')", 1),
    ],
)
def test_atexit_flush(collector, src_env, ending, code):
    script = EXIT_SCRIPT.format(key=WRITE_KEY, url=collector.url, exit_timeout=5, ending=ending)
    proc = subprocess.run([sys.executable, "-c", script], env=src_env, capture_output=True, timeout=30)
    assert proc.returncode == code, proc.stderr
    assert len(collector.events()) == 25
    assert b"can't create new thread" not in proc.stderr


def test_an_event_tracked_during_interpreter_exit_is_delivered(collector, src_env):
    script = textwrap.dedent(
        f"""
        import atexit, klime
        client = klime.Client({WRITE_KEY!r}, endpoint={collector.url!r}, flush_interval=60_000)
        # the first event arrives while the interpreter is shutting down
        atexit.register(lambda: client.track("Late", user_id="u"))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=src_env, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    assert [e["event"] for e in collector.events()] == ["Late"]


@pytest.mark.parametrize("mode", [Fault.blackhole(), None])
def test_exit_is_bounded_by_exit_timeout(collector, src_env, mode):
    if mode is not None:
        collector.set_mode(mode)
        url = collector.url
    else:
        url = "http://127.0.0.1:9"  # refused
    script = EXIT_SCRIPT.format(key=WRITE_KEY, url=url, exit_timeout=1.0, ending="pass")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=src_env, capture_output=True, timeout=30)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert elapsed < 1.0 + 2.5  # interpreter start-up + the 1 s bound


def test_explicit_shutdown_unregisters_the_exit_hook(collector, src_env):
    script = textwrap.dedent(
        f"""
        import klime
        client = klime.Client({WRITE_KEY!r}, endpoint={collector.url!r})
        client.track("E", user_id="u")
        client.shutdown(timeout=5)
        import klime._lifecycle as lc
        print(len(lc._exit_hooks))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], env=src_env, capture_output=True, timeout=30, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"
    assert len(collector.events()) == 1


def test_no_thread_can_start_then_events_are_sent_inline(collector, monkeypatch):
    """Python 3.12+ refuses new threads at interpreter shutdown; the queue drains inline."""

    class Refused(threading.Thread):
        def start(self):
            raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr("klime.transports._flights.Thread", Refused)
    monkeypatch.setattr("klime.transports._dropped.Thread", Refused)
    client = klime.Client(WRITE_KEY, endpoint=collector.url, max_batch_size=2, flush_interval=60_000)
    try:
        client.track("A", user_id="u")
        client.track("B", user_id="u")
        assert [e["event"] for e in collector.events()] == ["A", "B"]
        client.track("C", user_id="u")
    finally:
        monkeypatch.undo()
        client.shutdown(timeout=5)
    assert [e["event"] for e in collector.events()] == ["A", "B", "C"]


# --------------------------------------------------------------------------- round trips
# A collector that answers each request after 50 ms, like Klime's API seen from a data
# centre: one request at a time could deliver at most max_batch_size / 50 ms.

ROUND_TRIP = 0.05


def peak_in_flight_since(collector, since: float, until: float = float("inf")) -> int:
    """The most batch requests the collector handled at once from ``since`` on (to
    ``until``; time.monotonic()), from each request's arrival and answer times."""
    now = time.monotonic()
    points = []
    for request in collector.requests():
        end = request.answered_at if request.answered_at is not None else now
        if end >= since and request.started_at <= until:
            points += [(max(request.started_at, since), 1), (end, -1)]
    peak = current = 0
    for _, step in sorted(points, key=lambda p: (p[0], p[1])):  # an end before a start at a tie
        current += step
        peak = max(peak, current)
    return peak


def test_requests_in_flight_grow_under_a_backlog_at_slow_round_trips(make_client, collector):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    client = make_client(max_queue_size=2000)  # batch 20, max_concurrent_requests 32
    for i in range(2000):
        client.track("Backlog", {"i": i}, user_id="u")
    assert client.flush(timeout=30).unsent == 0
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 2000
    # 100 batches behind one another: several take off at once, never more than the ceiling
    assert 8 <= collector.peak_in_flight <= client.max_concurrent_requests
    assert collector.connection_count() <= client.max_concurrent_requests
    state = client.transport.in_flight()  # type: ignore[attr-defined]
    assert 1 <= state["threads"] <= client.max_concurrent_requests
    assert state["requests"] == 0 and conserved(client.stats())


def test_a_nearby_endpoint_gets_requests_in_flight_once_the_queue_is_half_full(make_client, collector):
    # 5 ms: a round trip mostly on the wire, short enough that one request carries a slow
    # trickle; a full queue is demand enough
    collector.set_mode(Fault.slow(0.005))
    client = make_client(max_queue_size=400)
    for i in range(400):  # the queue fills at once: 20 batches wait behind one request
        client.track("Near", {"i": i}, user_id="u")
    assert client.flush(timeout=30).unsent == 0
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 400
    assert collector.peak_in_flight > 1
    assert client.stats()["dropped"] == 0 and conserved(client.stats())


def test_a_remote_endpoint_gets_requests_in_flight_while_the_callers_thread_is_busy(make_client, collector):
    # The application's thread keeps the interpreter busy (a tight loop of track calls for
    # 0.8 s): the sender's round trips are still mostly wire time at 50 ms, so the limit
    # grows while the loop runs, not only after it.
    collector.set_mode(Fault.slow(ROUND_TRIP))
    client = make_client(max_queue_size=100_000)
    started = time.monotonic()
    tracked = 0
    while time.monotonic() - started < 0.8:  # bounded by time; the interpreter stays busy
        client.track("Busy", {"i": tracked}, user_id="u")
        tracked += 1
    busy_until = time.monotonic()
    assert client.flush(timeout=60).unsent == 0
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == client.stats()["sent"]  # the rest: dropped, counted
    assert peak_in_flight_since(collector, started, busy_until) > 2
    assert conserved(client.stats())


def test_less_than_a_batch_goes_one_request_at_a_time(make_client, collector):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    client = make_client(flush_interval=20, max_batch_size=20)
    for i in range(60):  # a trickle: never a full batch waiting
        client.track("Trickle", {"i": i}, user_id="u")
        if i % 5 == 4:
            assert wait_until(lambda n=i + 1: len(collector.events()) == n, 5)
    assert collector.peak_in_flight == 1


def test_max_concurrent_requests_bounds_requests_connections_and_threads(make_client, collector):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    before = {t for t in threading.enumerate() if t.name.startswith("klime-sender")}
    client = make_client(max_queue_size=1000, max_concurrent_requests=3)
    for i in range(600):
        client.track("Bounded", {"i": i}, user_id="u")
    assert client.flush(timeout=30).unsent == 0
    assert collector.peak_in_flight == 3
    assert collector.connection_count() <= 3
    ours = [t for t in threading.enumerate() if t.name.startswith("klime-sender") and t not in before]
    assert len(ours) <= 3


def test_in_flight_falls_to_one_on_503_and_nothing_is_lost_or_doubled(make_client, collector, on_error):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    client = make_client(
        max_queue_size=5000, retry_initial_delay=300, retry_max_attempts=20, on_error=on_error
    )
    transport = client.transport
    for i in range(1000):
        client.track("Before", {"i": i}, user_id="u")
    assert collector.wait_for_in_flight(4, timeout=10)  # the backlog has several in the air
    collector.set_mode(Fault.status_code(503, delay=ROUND_TRIP))
    for i in range(1000):
        client.track("During", {"i": i}, user_id="u")
    # every batch in the air is answered 503: the limit halves with each, the excess batches
    # are deferred (not retried now) and one batch retries with backoff
    assert wait_until(lambda: transport.in_flight()["requests"] == 1, 10), transport.in_flight()
    assert transport.in_flight()["limit"] == 1 and transport.in_flight()["deferred"] >= 1
    since, seen = time.monotonic(), len(collector.requests())
    assert collector.wait_for_requests(seen + 3, timeout=10)  # three more retries of that one batch
    assert peak_in_flight_since(collector, since) == 1, "a retry storm: more than one request at a time"
    collector.set_mode(Fault.slow(ROUND_TRIP))  # the server is back
    assert client.flush(timeout=60).unsent == 0
    arrived = collector.message_ids()
    assert len(arrived) == len(set(arrived)), "a messageId arrived twice after the recovery"
    stats = client.stats()
    assert on_error.events == [] and stats["failed"] == 0 and stats["dropped"] == 0, stats
    assert conserved(stats) and stats["sent"] == 2000
    # deferred batches kept their messageIds: everything that arrived after the outage is
    # the same set of events, each once
    names = {e["event"] for e in collector.events()}
    assert names <= {"Before", "During"}


def test_a_deferred_batch_never_gets_more_attempts_than_retry_max_attempts(make_client, collector, on_error):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    client = make_client(max_queue_size=2000, retry_initial_delay=20, retry_max_attempts=3, on_error=on_error)
    for i in range(600):
        client.track("Grow", {"i": i}, user_id="u")
    assert collector.wait_for_in_flight(4, timeout=10)
    collector.set_mode(Fault.status_code(503, delay=0.01))
    for i in range(200):
        client.track("Doomed", {"i": i}, user_id="u")
    client.flush(timeout=60)
    attempts: dict = {}
    for request in collector.requests():
        if request.status == 503:
            for event in request.json()["batch"]:
                attempts[event["messageId"]] = attempts.get(event["messageId"], 0) + 1
    assert attempts and max(attempts.values()) <= 3, max(attempts.values())
    stats = client.stats()
    assert conserved(stats) and stats["queued"] == 0
    assert stats["failed"] == len(on_error.events) and stats["failed"] >= 200


def test_conservation_is_exact_under_an_eight_thread_storm_at_50ms(make_client, collector, on_error):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    client = make_client(on_error=on_error)  # every default: queue 1000, batch 20
    per_thread, threads = STORM_EVENTS // 2, STORM_THREADS
    barrier = threading.Barrier(threads)

    def produce(t):
        barrier.wait()
        for i in range(per_thread):
            client.track("Storm", {"t": t, "i": i}, user_id=f"user_{i % 100}")

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert client.flush(timeout=60).unsent == 0
    assert wait_until(lambda: client.stats()["dropped"] == len(on_error.events), 10)
    stats = client.stats()
    total = per_thread * threads
    assert stats["tracked"] == total and conserved(stats) and stats["queued"] == 0, stats
    arrived = collector.message_ids()
    assert len(arrived) == len(set(arrived)) == stats["sent"]
    reported = {e["messageId"] for e in on_error.events}
    assert len(reported) == stats["dropped"] + stats["failed"]
    assert not reported & set(arrived), "an event was both delivered and reported lost"
    seen = {(e["properties"]["t"], e["properties"]["i"]) for e in collector.events()}
    seen |= {(e["properties"]["t"], e["properties"]["i"]) for e in on_error.events}
    assert len(seen) == total  # every event accounted for, once


EXIT_1000 = """
import time, klime
client = klime.Client({key!r}, endpoint={url!r})  # every default: exit_timeout 2 s
for i in range(1000):
    client.track("Exit", {{"i": i}}, user_id="u")
print(time.monotonic(), flush=True)
"""


def test_exit_flush_delivers_1000_events_at_50ms_within_exit_timeout(collector, src_env):
    collector.set_mode(Fault.slow(ROUND_TRIP))
    script = EXIT_1000.format(key=WRITE_KEY, url=collector.url)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=src_env, capture_output=True, timeout=60, text=True
    )
    ended = time.monotonic()
    assert proc.returncode == 0, proc.stderr
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 1000, proc.stderr
    # one at a time this would take 50 round trips (2.5 s), beyond exit_timeout (2 s)
    assert ended - float(proc.stdout.split()[-1]) < 2.0 + 0.5  # + process teardown
    assert proc.stderr == "", proc.stderr
