"""klime._ledger: the one place that counts, and builds a FlushResult from two tallies."""

from __future__ import annotations

import threading

from klime._ledger import Ledger, Tally


def test_counts_add_up_and_a_tally_is_a_frozen_snapshot():
    ledger = Ledger()
    before = ledger.tally()
    ledger.count(sent=3, requests=2, retries=1)
    ledger.count(failed=1, dropped=2)
    ledger.dropped_for_room_locked()
    assert before == Tally()
    assert ledger.tally() == Tally(sent=3, failed=1, dropped=3, retries=1, requests=2)
    assert ledger.tally().as_dict() == {"sent": 3, "failed": 1, "dropped": 3, "retries": 1, "requests": 2}


def test_a_flush_result_is_what_was_resolved_since_a_tally():
    ledger = Ledger()
    ledger.count(sent=10, failed=1)
    before = ledger.tally()
    ledger.count(sent=4, failed=2, dropped=1)
    result = ledger.result_since(before, unsent=3, expired=True)
    assert (result.sent, result.failed, result.dropped, result.unsent) == (4, 2, 1, 3)
    assert result.timed_out  # events left and the deadline passed
    assert not ledger.result_since(before, unsent=0, expired=True).timed_out
    assert ledger.result_since(before, unsent=0, timed_out=True).timed_out  # the caller's verdict wins


def test_counting_from_many_threads_loses_nothing():
    ledger = Ledger()

    def work() -> None:
        for _ in range(2000):
            ledger.count(sent=1, requests=1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert ledger.tally().sent == 16000 and ledger.tally().requests == 16000


class _Holding:
    """A transport as the ledger sees it: what it holds."""

    def __init__(self, **counts: int) -> None:
        self.held = dict(counts)

    def counts(self):
        return dict(self.held)


def _balanced(stats) -> bool:
    resolved = stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]
    return stats["tracked"] + stats["adopted"] == resolved  # the conservation law


def test_stats_are_the_ledgers_counts_with_what_its_transports_hold():
    ledger = Ledger()
    own = _Holding(accepted=9, pending=1, spooled=1, adopted=2)
    ledger.hold(own)
    ledger.hold(_Holding(accepted=2, pending=1))
    ledger.hold(own)  # a transport serving the *_sync calls too is read once
    ledger.count(sent=8, failed=1, dropped=2, retries=3, requests=4)
    stats = ledger.stats()
    assert stats == {
        "tracked": 11,
        "sent": 8,
        "failed": 1,
        "dropped": 2,
        "queued": 2,
        "spooled": 1,
        "adopted": 2,
        "retries": 3,
        "requests": 4,
    }
    assert _balanced(stats)
    alone = Ledger([_Holding(accepted=8, pending=0)])
    alone.count(sent=8)
    stats = alone.stats()
    assert (stats["tracked"], stats["queued"], stats["spooled"], stats["adopted"]) == (8, 0, 0, 0)
    assert _balanced(stats)


def test_events_a_transport_dropped_itself_count_as_dropped():
    ledger = Ledger([_Holding(accepted=5, pending=1, dropped=2)])
    ledger.count(sent=2)
    stats = ledger.stats()
    assert stats["dropped"] == 2 and _balanced(stats)


def test_a_fresh_ledger_reads_the_same_transports_with_no_counts():
    holding = _Holding(accepted=3, pending=3)
    ledger = Ledger()
    ledger.hold(holding)
    ledger.count(sent=3, requests=1)
    child = ledger.fresh()  # a forked child's: the transports are the same objects
    holding.held = {"accepted": 0, "pending": 0}
    assert child.tally() == Tally()
    assert child.stats()["tracked"] == 0 and _balanced(child.stats())
    holding.held = {"accepted": 1, "pending": 1}
    assert child.stats()["tracked"] == 1 and _balanced(child.stats())


def test_a_clients_stats_balance_through_overflow_and_sync_sends(make_client, collector):
    """A real client: tracked through the queue (some dropped for room) and sent at once
    (``track_sync``, another transport of the same ledger); the law holds once settled."""
    client = make_client(flush_interval=60_000, max_queue_size=5, max_batch_size=100)
    for i in range(12):
        client.track("Queued", {"i": i}, user_id="u")
    client.track_sync("Now", user_id="u")
    stats = client.stats()
    assert stats["tracked"] == 13 and stats["dropped"] == 7 and stats["sent"] == 1
    assert _balanced(stats)
    assert client.flush(timeout=10).unsent == 0
    stats = client.stats()
    assert (stats["sent"], stats["queued"]) == (6, 0) and _balanced(stats)


def test_a_memory_transport_is_read_once_though_it_serves_sync_calls_too(make_client):
    client = make_client(transport="memory")
    client.track("A", user_id="u")
    client.track_sync("B", user_id="u")
    stats = client.stats()
    assert stats["tracked"] == 2 and _balanced(stats)
