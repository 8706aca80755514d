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


def test_stats_are_the_ledgers_counts_with_what_the_transports_hold():
    ledger = Ledger()
    ledger.count(sent=8, failed=1, dropped=2, retries=3, requests=4)
    own = {"accepted": 9, "pending": 1, "spooled": 1, "adopted": 2}
    stats = ledger.stats(own, {"accepted": 2, "pending": 1})
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
    resolved = stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]
    assert stats["tracked"] + stats["adopted"] == resolved  # the conservation law
    alone = ledger.stats({"accepted": 8, "pending": 0})
    assert (alone["tracked"], alone["queued"], alone["spooled"], alone["adopted"]) == (8, 0, 0, 0)
