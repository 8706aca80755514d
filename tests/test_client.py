"""klime.Client: options, the sync calls, callbacks, module-level API, secrecy."""

from __future__ import annotations

import logging

import pytest

import klime
from conftest import WRITE_KEY, Recorder, conserved
from klime import ConfigurationError, SendError, ValidationError
from klime.devserver import Fault


def test_write_key_from_environment(monkeypatch, collector):
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    client = klime.Client()
    try:
        assert client.endpoint == collector.url
        client.track_sync("E", user_id="u")
        assert collector.events()[0]["event"] == "E"
    finally:
        client.shutdown()


@pytest.mark.parametrize("key", [None, ""])
def test_missing_write_key(key):
    with pytest.raises(ConfigurationError, match="write_key"):
        klime.Client(key)


def test_defaults():
    client = klime.Client("k", transport="memory")
    assert client.endpoint == "https://i.klime.com"
    assert client.flush_interval == 2000 and client.max_batch_size == 20
    assert client.max_queue_size == 1000 and client.retry_max_attempts == 5
    assert client.retry_initial_delay == 1000 and client.flush_on_shutdown is True
    assert client.exit_timeout == 2.0
    client.shutdown()


@pytest.mark.parametrize(
    "option, value",
    [
        ("flush_interval", -1),
        ("flush_interval", 0),
        ("flush_interval", "fast"),
        ("max_batch_size", 0),
        ("max_batch_size", 2.5),
        ("max_queue_size", 0),
        ("max_queue_size", True),
        ("retry_max_attempts", 0),
        ("retry_initial_delay", -5),
        ("retry_initial_delay", float("nan")),
        ("on_error", "not callable"),
        ("on_success", 42),
        ("transport", "carrier-pigeon"),
        ("transport", 3),
        ("sender", object()),
        ("flush_on_shutdown", "yes"),
        ("exit_timeout", -1),
        ("endpoint", "ftp://example.com"),
        ("endpoint", "http://example.com"),
    ],
)
def test_bad_options_name_the_option(option, value):
    with pytest.raises(ConfigurationError, match=option if option != "sender" else "sender"):
        klime.Client("k", **{option: value})


def test_batch_size_above_100_is_capped_with_one_warning(caplog_klime):
    client = klime.Client("k", max_batch_size=500, transport="memory")
    assert client.max_batch_size == 100
    warnings = [r for r in caplog_klime.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "100" in warnings[0].getMessage()
    client.shutdown()


def test_sync_calls_return_the_response(make_client, collector):
    client = make_client()
    r1 = client.track_sync("Signup", {"plan": "pro"}, user_id="u1")
    r2 = client.identify_sync("u1", {"email": "a@b.c"})
    r3 = client.group_sync("g1", {"name": "Acme"}, user_id="u1")
    assert (r1.accepted, r2.accepted, r3.accepted) == (1, 1, 1) and r1.status == "ok"
    assert [e["type"] for e in collector.events()] == ["track", "identify", "group"]
    stats = client.stats()
    assert stats["tracked"] == 3 and stats["sent"] == 3 and conserved(stats)


def test_sync_raises_send_error_with_wire_events(make_client, collector):
    on_error = Recorder()
    client = make_client(transport="blocking", on_error=on_error)
    collector.respond(Fault.status_code(400))
    with pytest.raises(SendError) as info:
        client.track_sync("Signup", {"plan": "pro"}, user_id="u1")
    err = info.value
    assert err.status_code == 400 and len(err.events) == 1
    assert err.events[0]["event"] == "Signup" and err.events[0]["properties"] == {"plan": "pro"}
    assert on_error.calls == []  # the exception is the report
    stats = client.stats()
    assert stats["failed"] == 1 and conserved(stats)


def test_sync_partial_failure_raises(make_client, collector):
    client = make_client()
    collector.respond(Fault.partial(0))
    with pytest.raises(SendError) as info:
        client.track_sync("E", user_id="u")
    assert info.value.response is not None and info.value.response.failed == 1


def test_sync_timeout_bounds_retries(make_client, collector):
    import time

    client = make_client(transport="blocking", retry_initial_delay=1000)
    collector.set_mode(Fault.status_code(500))
    start = time.monotonic()
    with pytest.raises(SendError):
        client.track_sync("E", user_id="u", timeout=0.5)
    assert time.monotonic() - start < 0.8


def test_validation_error_queues_nothing(make_client):
    client = make_client(transport="memory")
    with pytest.raises(ValidationError):
        client.track("E", {"bad": object()}, user_id="u")
    with pytest.raises(ValidationError):
        client.track("E")
    assert client.stats()["tracked"] == 0 and client.transport.events == []


def test_callbacks_that_raise_are_logged_not_fatal(make_client, collector, caplog_klime):
    def boom(*args):
        raise RuntimeError("callback bug")

    client = make_client(transport="blocking", on_error=boom, on_success=boom)
    collector.respond(Fault.status_code(400))
    client.track("E", user_id="u")  # failure -> on_error raises
    client.track("E", user_id="u")  # success -> on_success raises
    assert any("callback" in r.getMessage() for r in caplog_klime.records)
    stats = client.stats()
    assert stats["failed"] == 1 and stats["sent"] == 1 and conserved(stats)


def test_on_success_gets_the_response(make_client):
    seen = Recorder()
    client = make_client(transport="blocking", on_success=seen)
    client.track("E", user_id="u")
    (response,) = seen.calls[0]
    assert response.accepted == 1


def test_configure_sets_process_wide_defaults(make_client, collector):
    errors, successes = Recorder(), Recorder()
    klime.configure(on_error=errors, on_success=successes)
    client = make_client(transport="blocking")
    client.track("ok", user_id="u")
    collector.respond(Fault.status_code(401))
    client.track("bad", user_id="u")
    assert len(successes.calls) == 1 and len(errors.calls) == 1
    assert errors.events[0]["event"] == "bad"


def test_configure_logger(make_client, collector):
    records = []

    class ListLogger:
        def __getattr__(self, level):
            return lambda msg, *args, **kw: records.append((level, msg % args if args else msg))

    klime.configure(logger=ListLogger())
    client = make_client(transport="blocking")
    collector.respond(Fault.status_code(400))
    client.track("E", user_id="u")
    assert any(level == "error" for level, _ in records)


def test_a_logger_that_raises_breaks_nothing(make_client, collector):
    class Broken:
        def __getattr__(self, level):
            def fail(*a, **k):
                raise RuntimeError("logger down")

            return fail

    klime.configure(logger=Broken())
    client = make_client(transport="blocking")
    collector.respond(Fault.status_code(400))
    client.track("E", user_id="u")
    client.track("E", user_id="u")
    assert client.stats()["sent"] == 1 and client.stats()["failed"] == 1


def test_shutdown_is_idempotent_and_later_calls_are_noops(make_client, caplog_klime):
    client = make_client(transport="memory")
    client.track("a", user_id="u")
    client.shutdown()
    client.shutdown()
    client.track("b", user_id="u")
    client.identify("u")
    client.flush()
    assert [e["event"] for e in client.transport.events] == ["a"]
    assert sum("after shutdown" in r.getMessage() for r in caplog_klime.records) == 1
    with pytest.raises(SendError, match="shut down"):
        client.track_sync("c", user_id="u")


def test_context_manager_shuts_down(collector):
    with klime.Client(WRITE_KEY, endpoint=collector.url) as client:
        client.track("E", user_id="u")
    assert collector.wait_for_events(1, timeout=5)


def test_module_level_default_client(monkeypatch, collector):
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    klime.track("E", {"a": 1}, user_id="u")
    klime.identify("u", {"n": 1})
    klime.group("g", user_id="u")
    result = klime.flush(timeout=5)
    assert result.sent == 3 and result.unsent == 0
    assert klime.track_sync("S", user_id="u").accepted == 1
    assert klime.identify_sync("u").accepted == 1
    assert klime.group_sync("g").accepted == 1
    assert isinstance(klime.client, klime.Client)
    klime.shutdown()
    assert len(collector.events()) == 6


def test_module_level_set_client(collector):
    klime.client = klime.Client(WRITE_KEY, endpoint=collector.url, transport="memory")
    klime.track("E", user_id="u")
    assert klime.client.transport.events[0]["event"] == "E"


def test_write_key_never_in_repr_logs_or_errors(collector, caplog_klime):
    secret = "sk_live_SUPER_SECRET_123"
    client = klime.Client(secret, endpoint=collector.url, retry_initial_delay=1, retry_max_attempts=2)
    collector.respond(Fault.status_code(401))
    with pytest.raises(SendError) as info:
        client.track_sync("E", user_id="u")
    collector.set_mode(Fault.status_code(500))
    client.track("E", user_id="u")
    client.flush(timeout=5)
    client.shutdown(timeout=1)
    texts = [repr(client), str(info.value), repr(info.value), repr(client.sender), repr(client.transport)]
    texts += [r.getMessage() for r in caplog_klime.records]
    texts += [str(info.value.events), str(info.value.__dict__)]
    assert not [t for t in texts if secret in t]


def test_memory_transport_serves_sync_calls_without_network(make_client, collector):
    client = make_client(transport="memory")
    assert client.track_sync("E", user_id="u").accepted == 1
    assert client.transport.events[0]["event"] == "E"
    assert collector.requests() == []
    stats = client.stats()
    assert stats["tracked"] == 1 and stats["sent"] == 1 and conserved(stats)


def test_tiny_intervals_are_raised_to_floors_with_one_warning(collector, caplog_klime) -> None:
    """A flush_interval of 1 µs made an idle client burn a quarter of a core, and a
    retry_initial_delay of 0 made 1,025 requests in 2 s for one failing event (issue 20)."""
    import time as _time

    from klime._logging import log

    for option in ("flush_interval", "retry_initial_delay"):
        log.reset_once(f"floor-{option}")  # once per process: another test may have said it
    client = klime.Client(WRITE_KEY, endpoint=collector.url, flush_interval=0.001, retry_initial_delay=0)
    try:
        assert client.flush_interval == 10 and client.retry_initial_delay == 10
        floors = [r for r in caplog_klime.records if "below" in r.getMessage()]
        assert len(floors) == 2
        client.track("E", user_id="u")  # the sender thread is running from here
        assert client.flush(timeout=10).sent == 1
        cpu_before, wall_before = _time.process_time(), _time.monotonic()
        _time.sleep(1.0)  # idle: what the sender thread costs while nothing happens
        cpu = _time.process_time() - cpu_before
        wall = _time.monotonic() - wall_before
        assert cpu / wall < 0.05, f"an idle client used {cpu / wall:.0%} of a core"
    finally:
        client.shutdown(timeout=2)


def test_a_failing_endpoint_gets_retry_max_attempts_requests_per_event(collector) -> None:
    from klime.devserver import Fault

    collector.set_mode(Fault("status", status=503))
    client = klime.Client(WRITE_KEY, endpoint=collector.url, flush_interval=0.001, retry_initial_delay=0)
    try:
        client.track("E", user_id="u")
        result = client.flush(timeout=10)
        assert result.failed == 1
        assert len(collector.requests()) == client.retry_max_attempts
    finally:
        client.shutdown(timeout=2)


def test_caller_chosen_timestamps_and_ids_reach_the_wire_exactly(collector, make_client) -> None:
    """Issue 22: timestamp= and message_id= on every call, the *_sync forms and the
    module-level functions; a wrong type queues nothing."""
    import datetime as dt

    when = dt.datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    naive = dt.datetime(2025, 12, 31, 23, 59, 59)
    client = make_client()
    client.track("Order Placed", {"total": 42}, "u1", timestamp=when, message_id="order-1001")
    client.identify("u1", {"plan": "pro"}, timestamp=naive, message_id="identify-u1 ü \"q\"")
    client.group("org", {"name": "Acme"}, "u1", timestamp=when, message_id="group-org")
    client.track_sync("Synced", None, "u1", timestamp=naive, message_id="sync-1")
    klime.client = client
    klime.track("Module", user_id="u1", timestamp=when, message_id="module-1")
    bad_ones = ({"timestamp": "2026-03-01"}, {"timestamp": 1767225600}, {"message_id": ""}, {"message_id": 7})
    for bad in bad_ones:
        with pytest.raises(ValidationError):
            client.track("Bad", user_id="u1", **bad)
    assert client.flush(timeout=10).ok
    got = {e["messageId"]: e["timestamp"] for e in collector.events()}
    assert got == {
        "order-1001": "2026-03-01T10:30:15.123Z",
        'identify-u1 ü "q"': "2025-12-31T23:59:59.000Z",
        "group-org": "2026-03-01T10:30:15.123Z",
        "sync-1": "2025-12-31T23:59:59.000Z",
        "module-1": "2026-03-01T10:30:15.123Z",
    }
    assert client.stats()["tracked"] == 5
