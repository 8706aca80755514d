"""A stateful property test of one client against the faulting local collector.

Hypothesis drives random interleavings of track/identify/group (from one thread or a storm
of several), track_sync (also from several threads), flush (also concurrent with tracking),
fault-mode changes (standing modes, scripted faults, seeded random schedules) and shutdown.
Every event carries a unique ``seq``, so its fate can be followed through every request the
collector saw, every ``on_error`` call and every ``SendError``.

Checked after every step:

- ``tracked`` is exactly the number of events the client accepted, and the books never
  count more events than were tracked;
- no event is reported twice, every copy of an event carries the same ``messageId``, and no
  event is acknowledged twice or both acknowledged and reported unless its request was
  *ambiguous*: processed by the server while the client did not get the answer in time
  (a ``slow``/``drip`` fault, or a failure reported as a read timeout or as abandoned
  in flight at shutdown);
- ``flush`` and ``shutdown`` return within their timeout plus ``SLACK``.

Shutdown (alone, or racing with tracking threads) is allowed only in the second half of a
run, so that most steps exercise a live client.

At quiescent points (a flush that left nothing unsent, and the end of each run) the whole
conservation law is checked event by event: ``tracked == sent + failed + dropped + queued``
with ``queued == 0``, every event acknowledged or reported, ``sent`` equal to the events
acknowledged and not reported, ``failed + dropped`` equal to the events reported.

Size: ``KLIME_STATEFUL_EXAMPLES`` (default 40) runs of ``KLIME_STATEFUL_STEPS`` (default 30)
steps, derandomized (a fixed seed) unless ``KLIME_STATEFUL_RANDOM=1``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import klime
from conftest import WRITE_KEY, conserved
from klime import SendError
from klime.devserver import Collector, Fault
from klime.senders.http import HttpSender

EXAMPLES = int(os.environ.get("KLIME_STATEFUL_EXAMPLES", "40"))
STEPS = int(os.environ.get("KLIME_STATEFUL_STEPS", "30"))
RANDOM = os.environ.get("KLIME_STATEFUL_RANDOM") == "1"

#: flush/shutdown must return within timeout + SLACK (generous: a loaded 2-core machine).
SLACK = float(os.environ.get("KLIME_STATEFUL_SLACK", "1.5"))
#: The sender's read timeout; a ``slow`` fault longer than this is the ambiguous case.
READ_TIMEOUT = 1.0
AMBIGUOUS_SLOW = 1.3

#: The figures of every run, printed at the end (docs/reliability.md quotes them).
TOTALS: Counter = Counter()

FAULTS = st.sampled_from(
    [
        Fault.status_code(500),
        Fault.status_code(503),
        Fault.retry(429, retry_after="0"),
        Fault.status_code(408),
        Fault.status_code(400),
        Fault.status_code(401),
        Fault.status_code(413),
        Fault.partial(0),
        Fault.partial(1, 2),
        Fault.non_json_200(),
        Fault.unexpected_200(),
        Fault.reset_before_read(),
        Fault.reset_after_read(),
        Fault.blackhole(),
        Fault.slow(0.05),
        Fault.slow(AMBIGUOUS_SLOW),
        Fault.drip(0.002),
    ]
)
RANDOM_RATES = {
    "500": 0.1,
    "429": 0.05,
    "413": 0.05,
    "400": 0.03,
    "partial:0": 0.05,
    "reset_before_read": 0.05,
    "reset_after_read": 0.05,
    "non_json_200": 0.02,
    "slow:0.02": 0.05,
    "drip:0.001": 0.02,
}
#: Faults under which the server records the events before (maybe never) answering.
RECORDING_FAULTS = {"slow", "drip"}
#: Failures after which the server may have processed the events all the same.
AMBIGUOUS_REASONS = ("read timed out", "being sent")

TIMEOUTS = st.sampled_from([0.0, 0.05, 0.3, 1.0])


def seq_of(event: Dict[str, Any]) -> int:
    body = event.get("properties") or event.get("traits") or {}
    return int(body["seq"])


class ClientMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.collector = Collector(write_key=WRITE_KEY).start()
        self.lock = threading.Lock()
        self.reported: List[Tuple[str, List[Dict[str, Any]]]] = []  # on_error and SendError
        self.tracked = 0  # events the client accepted, by our own count
        self.next_seq = 0
        self.closed = False
        self.steps = 0
        self.client: Optional[klime.Client] = None

    # ----------------------------------------------------------------- set-up

    @initialize(
        batch=st.sampled_from([1, 3, 20]),
        queue=st.sampled_from([5, 50, 1000]),
        interval=st.sampled_from([20, 200, 60_000]),
        attempts=st.sampled_from([3, 1]),
    )
    def make_client(self, batch: int, queue: int, interval: int, attempts: int) -> None:
        sender = HttpSender(
            WRITE_KEY,
            self.collector.url,
            read_timeout=READ_TIMEOUT,
            connect_timeout=1.0,
            retry_max_attempts=attempts,
            retry_initial_delay=5,
        )
        self.client = klime.Client(
            WRITE_KEY,
            sender=sender,
            transport="background",
            max_batch_size=batch,
            max_queue_size=queue,
            flush_interval=interval,
            on_error=self.on_error,
            exit_timeout=0.5,
        )

    def on_error(self, error: SendError, events: List[Dict[str, Any]]) -> None:
        with self.lock:
            self.reported.append((error.message, list(events)))

    def seqs(self, n: int) -> List[int]:
        first = self.next_seq
        self.next_seq += n
        return list(range(first, first + n))

    def submit(self, kind: str, seq: int) -> None:
        assert self.client is not None
        if kind == "track":
            self.client.track("Stateful", {"seq": seq}, user_id=f"user-{seq % 7}")
        elif kind == "identify":
            self.client.identify(f"user-{seq % 7}", {"seq": seq})
        else:
            self.client.group(f"group-{seq % 3}", {"seq": seq}, user_id=f"user-{seq % 7}")
        if not self.closed:
            with self.lock:
                self.tracked += 1

    # ----------------------------------------------------------------- events

    @rule(n=st.integers(1, 30), kind=st.sampled_from(["track", "identify", "group"]))
    def track_some(self, n: int, kind: str) -> None:
        for seq in self.seqs(n):
            self.submit(kind, seq)

    @rule(threads=st.integers(2, 8), per_thread=st.integers(1, 25))
    def storm(self, threads: int, per_thread: int) -> None:
        work = [self.seqs(per_thread) for _ in range(threads)]
        kinds = ["track", "identify", "group"]
        pool = [
            threading.Thread(target=lambda w=w, i=i: [self.submit(kinds[(i + s) % 3], s) for s in w])
            for i, w in enumerate(work)
        ]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    @rule(threads=st.integers(1, 3), timeout=st.sampled_from([0.2, 1.0]))
    def track_sync(self, threads: int, timeout: float) -> None:
        assert self.client is not None
        client = self.client
        closed = self.closed

        def one(seq: int) -> None:
            try:
                client.track_sync("Sync", {"seq": seq}, user_id="sync-user", timeout=timeout)
            except SendError as exc:
                if exc.events:
                    with self.lock:
                        self.reported.append((exc.message, list(exc.events)))
                else:
                    assert closed and "shut down" in exc.message
            if not closed:
                with self.lock:
                    self.tracked += 1

        pool = [threading.Thread(target=one, args=(seq,)) for seq in self.seqs(threads)]
        start = time.monotonic()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        assert time.monotonic() - start < timeout + SLACK, "track_sync overran its timeout"

    # ----------------------------------------------------------------- flush / shutdown

    @rule(timeout=TIMEOUTS)
    def flush(self, timeout: float) -> None:
        assert self.client is not None
        start = time.monotonic()
        result = self.client.flush(timeout=timeout)
        assert time.monotonic() - start < timeout + SLACK, ("flush overran", timeout, result)
        if result.unsent == 0 and not self.closed:
            self.check_quiescent()
            TOTALS["quiescent checks"] += 1

    @rule(timeout=TIMEOUTS, trackers=st.integers(1, 4))
    def flush_while_tracking(self, timeout: float, trackers: int) -> None:
        assert self.client is not None
        client = self.client
        work = [self.seqs(10) for _ in range(trackers)]
        pool = [threading.Thread(target=lambda w=w: [self.submit("track", s) for s in w]) for w in work]
        flushers = []
        times: List[float] = []

        def flusher() -> None:
            start = time.monotonic()
            client.flush(timeout=timeout)
            times.append(time.monotonic() - start)

        for t in pool:
            t.start()
        for _ in range(2):
            f = threading.Thread(target=flusher)
            f.start()
            flushers.append(f)
        for t in pool + flushers:
            t.join()
        assert max(times) < timeout + SLACK, ("concurrent flush overran", timeout, times)

    @precondition(lambda self: not self.closed and self.steps >= STEPS // 2)
    @rule(timeout=st.sampled_from([0.0, 0.3, 1.0]), trackers=st.integers(1, 4))
    def shutdown_while_tracking(self, timeout: float, trackers: int) -> None:
        """Shut down while other threads track: whatever was accepted is resolved."""
        assert self.client is not None
        client = self.client
        before = client.stats()["tracked"]
        work = [self.seqs(15) for _ in range(trackers)]

        def track(seqs: List[int]) -> None:
            for seq in seqs:
                client.track("Raced", {"seq": seq}, user_id="racer")

        pool = [threading.Thread(target=track, args=(w,)) for w in work]
        for t in pool:
            t.start()
        start = time.monotonic()
        client.shutdown(timeout=timeout)
        elapsed = time.monotonic() - start
        for t in pool:
            t.join()
        self.closed = True
        assert elapsed < timeout + SLACK, ("shutdown overran", timeout, elapsed)
        after = client.stats()
        assert before <= after["tracked"] <= before + 15 * trackers, (before, after)
        with self.lock:
            self.tracked = after["tracked"]  # which racers got in is the race's to decide
        self.after_shutdown()

    @precondition(lambda self: not self.closed and self.steps >= STEPS // 2)
    @rule(timeout=st.sampled_from([0.0, 0.3, 1.0]))
    def shutdown(self, timeout: float) -> None:
        assert self.client is not None
        start = time.monotonic()
        result = self.client.shutdown(timeout=timeout)
        assert time.monotonic() - start < timeout + SLACK, ("shutdown overran", timeout, result)
        self.closed = True
        self.after_shutdown()

    def after_shutdown(self) -> None:
        """Once the sender threads have finished the batches they may still hold (a shutdown
        deadline does not wait for them; each hands a batch the deadline cut short to
        ``on_error`` itself, just after), everything tracked is resolved, event by event."""
        assert self.client is not None
        transport = self.client.transport
        threads = [transport._thread, *transport.flights.alive()]  # type: ignore[attr-defined]
        ends = time.monotonic() + READ_TIMEOUT * 3 + SLACK  # their requests are cut at the deadline
        for thread in threads:
            if isinstance(thread, threading.Thread):
                thread.join(max(0.0, ends - time.monotonic()))
                assert not thread.is_alive(), f"a sender thread outlived shutdown: {thread.name}"
        self.check_quiescent()
        TOTALS["shutdowns"] += 1

    # ----------------------------------------------------------------- faults

    @rule(fault=st.one_of(st.none(), st.none(), FAULTS))
    def set_mode(self, fault: Optional[Fault]) -> None:
        self.collector.set_random_faults(None, {})
        self.collector.set_mode(fault)

    @rule(faults=st.lists(FAULTS, min_size=1, max_size=3))
    def script(self, faults: List[Fault]) -> None:
        self.collector.respond(*faults)

    @rule(seed=st.integers(0, 2**16))
    def random_faults(self, seed: int) -> None:
        self.collector.set_mode(None)
        self.collector.set_random_faults(seed, RANDOM_RATES)

    # ----------------------------------------------------------------- invariants

    def ambiguous(self) -> Set[int]:
        seqs: Set[int] = set()
        for request in self.collector.requests():
            if request.fault in RECORDING_FAULTS and request.body:
                seqs.update(seq_of(e) for e in request.json()["batch"])
        with self.lock:
            for message, events in self.reported:
                if any(reason in message for reason in AMBIGUOUS_REASONS):
                    seqs.update(seq_of(e) for e in events)
        return seqs

    def ledgers(self) -> Tuple[Counter, Counter]:
        accepted = Counter(seq_of(e) for e in self.collector.events())
        with self.lock:
            reported = Counter(seq_of(e) for _, events in self.reported for e in events)
        return accepted, reported

    @invariant()
    def books_never_overcount(self) -> None:
        self.steps += 1
        if self.client is None:
            return
        stats = self.client.stats()
        t = self.client.transport  # white-box: events held in memory, overflow not yet reported included
        with t.lock:  # type: ignore[attr-defined]
            memory = t._memory  # type: ignore[attr-defined]
            held = len(memory.events) + len(memory.drops.held) + t.flights.held_locked()  # type: ignore[attr-defined]
        # in the air or deferred: at most max_concurrent_requests batches beside the queue
        in_air = self.client.max_concurrent_requests * self.client.max_batch_size
        over = held - self.client.max_queue_size - in_air
        key = "most events held beyond max_queue_size + the batches in flight"
        TOTALS[key] = max(TOTALS[key], over)
        with self.lock:
            assert stats["tracked"] == self.tracked, (stats, self.tracked)
        assert min(stats.values()) >= 0, stats
        assert stats["sent"] + stats["failed"] + stats["dropped"] <= stats["tracked"], stats

    @invariant()
    def nothing_twice_unless_ambiguous(self) -> None:
        accepted, reported = self.ledgers()
        assert max(reported.values(), default=0) <= 1, [s for s, n in reported.items() if n > 1]
        suspicious = {s for s, n in accepted.items() if n > 1} | (set(accepted) & set(reported))
        if suspicious:
            unexplained = suspicious - self.ambiguous()
            assert not unexplained, ("acknowledged twice, or acknowledged and reported", sorted(unexplained))
            TOTALS["ambiguous events seen"] = max(TOTALS["ambiguous events seen"], len(suspicious))
        ids: Dict[int, Set[str]] = defaultdict(set)
        for request in self.collector.requests():
            if request.body:
                for e in request.json()["batch"]:
                    ids[seq_of(e)].add(e["messageId"])
        with self.lock:
            for _, events in self.reported:
                for e in events:
                    ids[seq_of(e)].add(e["messageId"])
        assert not [s for s, m in ids.items() if len(m) > 1], "an event changed its messageId"

    def check_quiescent(self) -> None:
        """Everything tracked so far is resolved: the conservation law, event by event."""
        assert self.client is not None
        stats = self.client.stats()
        assert stats["queued"] == 0 and conserved(stats), stats
        accepted, reported = self.ledgers()
        everything = set(range(self.next_seq))
        resolved = set(accepted) | set(reported)
        assert resolved <= everything
        assert len(resolved) == stats["tracked"], (len(resolved), stats)
        ambiguous = self.ambiguous()
        for seq in resolved - ambiguous:
            assert accepted[seq] + reported[seq] == 1, (seq, accepted[seq], reported[seq])
        assert stats["sent"] == sum(1 for s in resolved if accepted[s] and not reported[s]), stats
        assert stats["failed"] + stats["dropped"] == sum(reported.values()), stats

    def teardown(self) -> None:
        try:
            client = self.client
            if client is None:
                return
            if not self.closed:
                self.shutdown(1.0)  # joins the sender thread and checks the books
            self.collector.set_random_faults(None, {})
            self.collector.set_mode(None)  # releases black-holed requests
            self.nothing_twice_unless_ambiguous()
            stats = client.stats()
            accepted, reported = self.ledgers()
            TOTALS["runs"] += 1
            TOTALS["tracked"] += stats["tracked"]
            TOTALS["sent"] += stats["sent"]
            TOTALS["failed"] += stats["failed"]
            TOTALS["dropped"] += stats["dropped"]
            TOTALS["requests"] += stats["requests"]
            TOTALS["retries"] += stats["retries"]
            TOTALS["duplicates"] += sum(n - 1 for n in accepted.values() if n > 1)
            TOTALS["acknowledged and reported"] += len(set(accepted) & set(reported))
            TOTALS["faulted requests"] += sum(1 for r in self.collector.requests() if r.fault)
        finally:
            self.collector.stop()


ClientMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    derandomize=not RANDOM,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)


class TestClientMachine(ClientMachine.TestCase):  # type: ignore[misc, valid-type]
    """Collected by pytest."""


@pytest.fixture(scope="module", autouse=True)
def _print_totals() -> Any:
    yield
    if TOTALS:
        print("\nstateful totals: " + ", ".join(f"{k}={v}" for k, v in sorted(TOTALS.items())))
