"""Tests for klime.testing: capture(), CapturedEvents and its assertion helpers.

"No network" is checked against a real local collector: clients inside a capture point at
it, and it must receive nothing.
"""

from __future__ import annotations

import datetime
import threading
from decimal import Decimal

import pytest

import klime
from conftest import WRITE_KEY, conserved
from klime.testing import CapturedEvents, capture
from klime.transports import _choice as transports


def real_client(collector, **options):
    return klime.Client(WRITE_KEY, endpoint=collector.url, retry_initial_delay=10, **options)


def test_capture_records_every_call_and_sends_nothing(collector):
    """Clients created inside capture() record track/identify/group and *_sync calls; the
    collector they point at receives no request."""
    with capture() as events:
        client = real_client(collector)
        client.identify("u1", {"email": "ada@example.com"})
        client.track("Signup", {"plan": "pro"}, user_id="u1")
        client.group("org_1", {"name": "Acme"}, user_id="u1")
        response = client.track_sync("Checkout", {"total": 12}, user_id="u1")
        client.identify_sync("u2")
        client.group_sync("org_2", user_id="u2")
        assert client.flush().ok
        client.shutdown()
    assert response == klime.BatchResponse("ok", 1)
    assert [e["type"] for e in events.events] == ["identify", "track", "group", "track", "identify", "group"]
    assert events.events[1]["properties"] == {"plan": "pro"}
    assert collector.requests() == []
    stats = client.stats()
    assert stats["tracked"] == stats["sent"] == 6 and conserved(stats)


def test_events_are_the_wire_dicts(collector):
    with capture() as events:
        real_client(collector).track("Signup", {"at": datetime.date(2024, 5, 1)}, user_id=7)
    (event,) = events.events
    assert event["event"] == "Signup"
    assert event["userId"] == "7"
    assert event["properties"] == {"at": "2024-05-01"}
    assert event["context"]["library"]["name"] == "python-sdk"
    assert len(event["messageId"]) == 36
    assert events.raw[0].startswith(b'{"type":"track"')


def test_default_client_is_swapped_and_restored(monkeypatch):
    """klime.track() is captured without any write key, and klime.client is put back."""
    monkeypatch.delenv("KLIME_WRITE_KEY", raising=False)
    before = klime.Client("some-key", transport="memory")
    klime.client = before
    try:
        with capture() as events:
            assert klime.client is not before
            klime.track("Signup", user_id="u1")
            klime.identify("u1", {"name": "Ada"})
            klime.group("org_1", user_id="u1")
            assert klime.track_sync("Paid", user_id="u1").accepted == 1
        assert klime.client is before
        assert before.stats()["tracked"] == 0
        events.assert_tracked("Signup", user_id="u1")
        events.assert_tracked("Paid", user_id="u1")
        events.assert_identified("u1", traits={"name": "Ada"})
        events.assert_grouped("org_1", user_id="u1")
    finally:
        before.shutdown()


def test_default_client_restored_when_test_code_replaced_it():
    with capture():
        replaced = klime.client = klime.Client("k")
    assert klime.client is None
    replaced.shutdown()


def test_state_restored_after_exception(collector):
    with pytest.raises(RuntimeError), capture():
        raise RuntimeError("boom")
    assert transports._override is None
    assert klime.client is None
    client = real_client(collector)
    assert client.track_sync("After", user_id="u1").accepted == 1
    client.track("After", user_id="u1")
    client.flush(timeout=5)
    assert [e["event"] for e in collector.events()] == ["After", "After"]
    client.shutdown()


def test_clients_created_before_capture_keep_sending(collector):
    """The transport is chosen when a Client is created: an older client still sends."""
    client = real_client(collector)
    with capture() as events:
        client.track("Outside", user_id="u1")
        client.flush(timeout=5)
    assert len(events) == 0
    assert [e["event"] for e in collector.events()] == ["Outside"]
    client.shutdown()


def test_a_client_made_during_a_capture_stays_a_test_client(collector):
    """A client created in one capture (e.g. a lazily built singleton) never sends, and its
    events are recorded by the captures active when they happen."""
    with capture():
        client = real_client(collector)
    client.track("Between", user_id="u1")  # no capture active: recorded nowhere, not sent
    with capture() as later:
        client.track("Later", user_id="u1")
    later.assert_tracked("Later")
    later.assert_not_tracked("Between")
    client.flush()
    client.shutdown()
    assert collector.requests() == []


def test_captures_nest():
    with capture() as outer:
        klime.track("First", user_id="u1")
        with capture() as inner:
            klime.track("Second", user_id="u1")
        klime.track("Third", user_id="u1")
        assert transports._override is not None
    assert [e["event"] for e in outer.events] == ["First", "Second", "Third"]
    assert [e["event"] for e in inner.events] == ["Second"]
    assert transports._override is None


def test_threads_all_captured():
    threads_n, per_thread = 8, 250
    with capture() as events:
        client = klime.Client("k")

        def work(n: int) -> None:
            for i in range(per_thread):
                client.track("Tick", {"i": i}, user_id=f"u{n}")

        threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(events) == threads_n * per_thread
    assert len({e["messageId"] for e in events}) == threads_n * per_thread
    for n in range(threads_n):
        assert len(events.tracked("Tick", user_id=f"u{n}")) == per_thread
    assert conserved(client.stats())


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def sample() -> CapturedEvents:
    with capture() as events:
        klime.identify("u1", {"email": "ada@example.com", "plan": "pro"})
        klime.track("Signup", {"plan": "pro", "seats": 3}, user_id="u1")
        klime.track("Signup", {"plan": "free"}, user_id=42)
        klime.track("Report Run", {"at": datetime.datetime(2024, 5, 1, 12, 0)}, group_id="org_1")
        klime.group("org_1", {"name": "Acme", "price": Decimal("9.5")}, user_id="u1")
        klime.group("org_2")
    return events


def test_tracked_filters(sample):
    assert len(sample.tracked()) == 3
    assert len(sample.tracked("Signup")) == 2
    assert [e["userId"] for e in sample.tracked("Signup", user_id="u1")] == ["u1"]
    assert sample.tracked("Signup", user_id=42)[0]["properties"] == {"plan": "free"}
    assert sample.tracked(group_id="org_1")[0]["event"] == "Report Run"
    assert sample.tracked("Signup", properties={"seats": 3})[0]["userId"] == "u1"
    assert sample.tracked("Signup", properties={"seats": 4}) == []
    assert sample.tracked("Signup", properties={"missing": None}) == []
    assert len(sample.identified()) == 1 and sample.identified("nobody") == []
    assert len(sample.grouped()) == 2
    assert sample.grouped(user_id="u1")[0]["groupId"] == "org_1"


def test_assert_tracked_returns_the_latest_match(sample):
    assert sample.assert_tracked("Signup")["userId"] == "42"
    assert (
        sample.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"})["properties"]["seats"] == 3
    )


def test_expected_values_are_converted_like_tracked_ones(sample):
    """A datetime, an int id or a Decimal match what klime put on the wire."""
    sample.assert_tracked("Report Run", properties={"at": datetime.datetime(2024, 5, 1, 12, 0)})
    sample.assert_tracked(user_id=42)
    sample.assert_grouped("org_1", traits={"price": Decimal("9.5")})


def test_count(sample):
    sample.assert_tracked("Signup", count=2)
    sample.assert_tracked("Nope", count=0)
    with pytest.raises(AssertionError, match=r"expected 1 track \"Signup\" event\(s\), found 2"):
        sample.assert_tracked("Signup", count=1)
    with pytest.raises(AssertionError, match="expected no"):
        sample.assert_tracked("Signup", count=0)
    sample.assert_identified("u1", count=1)
    sample.assert_grouped(count=2)


def test_failure_message_lists_what_was_captured(sample):
    with pytest.raises(AssertionError) as info:
        sample.assert_tracked("Signup", user_id="u9", properties={"plan": "pro"})
    message = str(info.value)
    assert message.splitlines()[0] == (
        'expected a track "Signup" user_id=\'u9\' properties including {"plan": "pro"} event'
    )
    assert "6 events were captured:" in message
    assert '  track "Signup" user_id=\'u1\' properties={"plan": "pro", "seats": 3}' in message
    assert "  identify user_id='u1' traits=" in message
    assert "  group group_id='org_2'" in message


def test_failure_message_when_nothing_captured():
    with capture() as events:
        pass
    with pytest.raises(AssertionError, match="no events were captured"):
        events.assert_identified("u1")


def test_long_listing_is_cut():
    with capture() as events:
        for i in range(30):
            klime.track("E", {"i": i}, user_id="u")
    with pytest.raises(AssertionError) as info:
        events.assert_tracked("Missing")
    message = str(info.value)
    assert "30 events were captured:" in message
    assert "... 10 earlier events not shown" in message
    assert '{"i": 29}' in message and '{"i": 9}' not in message


def test_assert_not_tracked(sample):
    sample.assert_not_tracked("Signup", user_id="u2")
    with pytest.raises(AssertionError, match='expected no track "Signup"'):
        sample.assert_not_tracked("Signup")


def test_assert_identified_and_grouped(sample):
    assert sample.assert_identified("u1", traits={"plan": "pro"})["traits"]["email"] == "ada@example.com"
    with pytest.raises(AssertionError, match="expected a identify user_id='u1' traits including"):
        sample.assert_identified("u1", traits={"plan": "free"})
    assert "userId" not in sample.assert_grouped("org_2")
    with pytest.raises(AssertionError, match="expected a group group_id='org_3'"):
        sample.assert_grouped("org_3")


def test_clear_len_iter_repr():
    with capture() as events:
        klime.track("A", user_id="u")
        assert len(events) == 1
        events.clear()
        klime.track("B", user_id="u")
    assert [e["event"] for e in events] == ["B"]
    assert repr(events) == "<klime.testing.CapturedEvents 1 events>"


def test_memory_transport_is_reexported():
    from klime.testing import MemoryTransport

    assert MemoryTransport is klime.MemoryTransport
