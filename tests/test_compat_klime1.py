"""klime 1.x code runs unchanged on klime 2 (issue 19): its names, positional calls,
callbacks, errors and examples, against a real collector on 127.0.0.1.

Each test is one row of the issue's table, written the way klime 1.1.0's README and
modules have users write it.
"""

from __future__ import annotations

import logging
import pickle
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

import klime
from conftest import WRITE_KEY, conserved, wait_until
from klime.devserver import Collector, Fault


@pytest.fixture
def black_hole() -> Iterator[str]:
    """An endpoint that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


# ---------------------------------------------------------------------------------- names


def test_klime1_top_level_names_import() -> None:
    from klime import BatchResponse, KlimeClient, SendError

    assert KlimeClient is klime.Client
    assert BatchResponse is klime.BatchResponse
    assert SendError is klime.SendError
    assert klime.__version__.startswith("2.")


def test_klime_types_is_klime1s_module_not_the_stdlib_one() -> None:
    import klime.types
    from klime.types import (
        BatchResponse,
        Event,
        EventContext,
        EventType,
        LibraryInfo,
        SendError,
        ValidationError,
    )

    assert klime.types.__name__ == "klime.types"
    assert EventType.TRACK == "track" and EventType("group") is EventType.GROUP
    # 1.x's ValidationError is one rejected event of a response: klime 2's EventError
    assert ValidationError is klime.EventError
    rejected = ValidationError(index=0, message="bad", code="invalid")
    assert (rejected.index, rejected.message, rejected.code) == (0, "bad", "invalid")
    # klime's own bad-input exception keeps its name at the top level
    assert issubclass(klime.ValidationError, klime.KlimeError)
    assert BatchResponse is klime.BatchResponse and SendError is klime.SendError
    event = Event(
        type=EventType.TRACK,
        messageId="m-1",
        timestamp="2026-01-01T00:00:00.000Z",
        event="Signed Up",
        userId="u",
        properties={"plan": "pro"},
        context=EventContext(library=LibraryInfo(name="python-sdk", version="1.1.0")),
    )
    assert event.to_dict() == {
        "type": "track",
        "messageId": "m-1",
        "timestamp": "2026-01-01T00:00:00.000Z",
        "event": "Signed Up",
        "userId": "u",
        "properties": {"plan": "pro"},
        "context": {"library": {"name": "python-sdk", "version": "1.1.0"}},
    }


def test_klime_client_module_of_klime1_imports() -> None:
    from klime.client import DEFAULT_ENDPOINT, MAX_BATCH_SIZE, SDK_VERSION, KlimeClient

    assert KlimeClient is klime.Client
    assert DEFAULT_ENDPOINT == "https://i.klime.com"
    assert MAX_BATCH_SIZE == 100
    assert SDK_VERSION == klime.__version__
    # the attribute klime.client stays klime 2's default client (None until set)
    assert klime.client is None


# ---------------------------------------------------------------------------------- calls


def test_positional_calls_as_klime1s_readme_writes_them(collector: Collector) -> None:
    client = klime.KlimeClient(WRITE_KEY, collector.url)
    try:
        client.identify("user_123", {"email": "user@example.com", "name": "Stefan"})
        client.track("Button Clicked", {"button_name": "Sign up", "plan": "pro"}, "user_123")
        client.track("Events Received", {"count": 100, "source": "webhook"}, None, "org_456")
        client.group("org_456", {"name": "Acme Inc", "plan": "enterprise"}, "user_123")
        client.group("org_456", user_id="user_123")
        assert client.flush(timeout=10).ok
    finally:
        client.shutdown()
    by_type = [(e["type"], e.get("event"), e.get("userId"), e.get("groupId")) for e in collector.events()]
    assert by_type == [
        ("identify", None, "user_123", None),
        ("track", "Button Clicked", "user_123", None),
        ("track", "Events Received", None, "org_456"),
        ("group", None, "user_123", "org_456"),
        ("group", None, "user_123", "org_456"),
    ]
    assert collector.events()[0]["context"]["library"] == {"name": "python-sdk", "version": klime.__version__}


def test_every_constructor_option_by_position_in_klime1s_order(collector: Collector) -> None:
    seen: List[Any] = []
    client = klime.KlimeClient(
        WRITE_KEY,  # write_key
        collector.url,  # endpoint
        500,  # flush_interval (ms)
        10,  # max_batch_size
        50,  # max_queue_size
        3,  # retry_max_attempts
        10,  # retry_initial_delay (ms)
        True,  # flush_on_shutdown
        logging.getLogger("myapp.klime"),  # logger
        lambda error, events: seen.append(events),  # on_error
        lambda response: seen.append(response),  # on_success
    )
    try:
        assert client.write_key == WRITE_KEY and client.endpoint == collector.url
        assert WRITE_KEY not in repr(client)
        assert (client.flush_interval, client.max_batch_size, client.max_queue_size) == (500, 10, 50)
        assert (client.retry_max_attempts, client.retry_initial_delay) == (3, 10)
        client.track("E", {}, "u")
        assert client.flush(timeout=10).sent == 1
        assert [type(x).__name__ for x in seen] == ["BatchResponse"]
    finally:
        client.shutdown()


def test_logger_keyword_receives_klimes_records(collector: Collector) -> None:
    records: List[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    app_logger = logging.getLogger("myapp.klime")
    handler = Keep(level=logging.DEBUG)
    app_logger.addHandler(handler)
    app_logger.setLevel(logging.DEBUG)
    try:
        collector.respond(Fault("status", status=400))
        client = klime.KlimeClient(write_key=WRITE_KEY, endpoint=collector.url, logger=app_logger)
        client.track("E", user_id="u")
        client.flush(timeout=10)
        client.shutdown()
    finally:
        app_logger.removeHandler(handler)
    assert any(r.levelno >= logging.WARNING and "rejected" in r.getMessage() for r in records)
    assert all(WRITE_KEY not in r.getMessage() for r in records)


def test_queue_size_counts_what_is_waiting(collector: Collector) -> None:
    client = klime.KlimeClient(WRITE_KEY, collector.url, flush_interval=600_000, max_batch_size=100)
    try:
        assert client.queue_size() == 0
        for i in range(3):
            client.track("E", {"i": i}, "u")
        assert client.queue_size() == 3
        client.flush(timeout=10)
        assert client.queue_size() == 0
    finally:
        client.shutdown()


# ---------------------------------------------------------------------------------- errors


def test_on_error_gets_events_that_read_as_klime1_events(collector: Collector) -> None:
    calls: List[Any] = []

    def handle_error(error: Exception, events: List[Any]) -> None:  # 1.1.0's README callback
        calls.append((error, [e.to_dict() for e in events], [e.messageId for e in events], events))

    collector.respond(Fault("status", status=400))
    client = klime.KlimeClient(write_key=WRITE_KEY, endpoint=collector.url, on_error=handle_error)
    client.track("Button Clicked", {"plan": "pro"}, user_id="user_123")
    client.flush(timeout=10)
    assert wait_until(lambda: len(calls) == 1)
    error, dicts, ids, events = calls[0]
    assert isinstance(error, klime.SendError)
    assert dicts[0]["event"] == "Button Clicked" and dicts[0]["properties"] == {"plan": "pro"}
    assert ids == [dicts[0]["messageId"]]
    event = events[0]
    assert event.type == klime.types.EventType.TRACK and event.type.value == "track"
    assert event.userId == "user_123" and event.groupId is None
    assert event.context is not None and event.context.library is not None
    assert event.context.library.version == klime.__version__
    # ... and is still what klime 2 documents: the wire dict
    assert event["messageId"] == event.messageId and isinstance(event, dict)
    assert error.events == events
    stats = client.stats()
    assert conserved(stats) and stats["failed"] == 1
    client.shutdown()


def test_send_error_built_as_klime1_tests_build_it() -> None:
    from klime.types import Event, EventType

    event = Event(type=EventType.IDENTIFY, messageId="m", timestamp="t", userId="u", traits={"a": 1})
    err = klime.SendError("x", [event])
    assert (err.message, err.events, err.status_code) == ("x", [event], None)
    assert err.events[0].traits == {"a": 1}
    from_dicts = klime.SendError("y", [{"type": "track", "messageId": "n", "event": "E"}])
    assert from_dicts.events[0].messageId == "n" and from_dicts.events[0].event == "E"
    # klime 2's own form keeps working
    own = klime.SendError("z", 503, [event.to_dict()])
    assert own.status_code == 503 and own.events[0].userId == "u"
    again = pickle.loads(pickle.dumps(err))
    assert again.events == err.events and again.events[0].messageId == "m"


def test_track_sync_returns_batch_response_and_raises_send_error_on_failure(collector: Collector) -> None:
    client = klime.KlimeClient(WRITE_KEY, collector.url)
    try:
        response = client.track_sync("Critical Action", {"key": "value"}, "user_123")
        assert (response.status, response.accepted, response.failed) == ("ok", 1, 0)
        # a rejected event: klime 1.1.0 returned BatchResponse(failed=1); klime 2 raises
        # SendError with the server's answer on it (docs/migration.md says why)
        collector.respond(Fault("partial", failed_indices=(0,)))
        with pytest.raises(klime.SendError) as info:
            client.track_sync("Critical Action", {"key": "value"}, user_id="user_123")
        assert info.value.response is not None and info.value.response.failed == 1
        assert info.value.events[0].event == "Critical Action"
        assert info.value.message
    finally:
        client.shutdown()


# ---------------------------------------------------------------------------------- shutdown bound


def test_shutdown_without_timeout_is_bounded(black_hole: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from klime import _client

    monkeypatch.setattr(_client, "DEFAULT_SHUTDOWN_TIMEOUT", 0.5)
    calls: List[Any] = []
    client = klime.KlimeClient(WRITE_KEY, black_hole, on_error=lambda e, ev: calls.append(ev))
    client.track("E", user_id="u")
    started = time.monotonic()
    result = client.shutdown()
    took = time.monotonic() - started
    assert result.timed_out and result.unsent == 0 and result.failed + result.dropped == 1
    assert took < 5.0, took  # the default (here 0.5 s), not the retries (tens of seconds)
    assert sum(len(c) for c in calls) == 1
    assert conserved(client.stats())


def _run(code: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_atexit_register_shutdown_exits_within_exit_timeout(black_hole: str, src_env: dict) -> None:
    """1.1.0's Flask example registers ``atexit.register(client.shutdown)``; against a
    black-holed endpoint that took 63.9 s to exit. Now: within ``exit_timeout``."""
    src_env["KLIME_ENDPOINT"] = black_hole
    started = time.monotonic()
    done = _run(
        f"""
        import atexit, time
        from klime import KlimeClient
        client = KlimeClient(write_key={WRITE_KEY!r}, exit_timeout=1)
        client.track('Button Clicked', {{'button_name': 'x'}}, user_id='u')
        atexit.register(client.shutdown)
        """,
        src_env,
    )
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert took < 15, took  # exit_timeout=1 plus interpreter start-up; not a minute
    assert "1 events were reported to on_error and are lost" in done.stderr  # said, not silent


# ---------------------------------------------------------------------------------- examples


KLIME1_README_QUICK_START = """
from klime import KlimeClient

client = KlimeClient(
    write_key='your-write-key'
)

# Identify a user
client.identify('user_123', {
    'email': 'user@example.com',
    'name': 'Stefan'
})

# Track an event
client.track('Button Clicked', {
    'button_name': 'Sign up',
    'plan': 'pro'
}, user_id='user_123')

# Associate user with a group and set group traits
client.group('org_456', {
    'name': 'Acme Inc',
    'plan': 'enterprise'
}, user_id='user_123')

# Or just link the user to a group (if traits are already set)
client.group('org_456', user_id='user_123')

# Shutdown gracefully
client.shutdown()
"""


def test_klime1_readme_quick_start_runs_unchanged(src_env: dict) -> None:
    with Collector(write_key="your-write-key") as collector:
        src_env["KLIME_ENDPOINT"] = collector.url  # the only change: where "Klime" is
        done = _run(KLIME1_README_QUICK_START, src_env)
        assert done.returncode == 0, done.stderr
        assert [e["type"] for e in collector.events()] == ["identify", "track", "group", "group"]


KLIME1_FLASK_EXAMPLE = """
from flask import Flask, request
from klime import KlimeClient

app = Flask(__name__)
client = KlimeClient(write_key='your-write-key')

@app.route('/api/button-clicked', methods=['POST'])
def button_clicked():
    client.track('Button Clicked', {
        'button_name': request.json.get('buttonName')
    }, user_id=request.json.get('userId'))

    return {'success': True}

# Graceful shutdown
import atexit
atexit.register(client.shutdown)
"""


def test_klime1_flask_example_runs_unchanged(src_env: dict, tmp_path: Path) -> None:
    pytest.importorskip("flask")
    (tmp_path / "klime1_flask_app.py").write_text(KLIME1_FLASK_EXAMPLE)
    src_env["PYTHONPATH"] = str(tmp_path) + ":" + src_env["PYTHONPATH"]
    with Collector(write_key="your-write-key") as collector:
        src_env["KLIME_ENDPOINT"] = collector.url
        done = _run(
            """
            from klime1_flask_app import app
            web = app.test_client()
            for i in range(3):
                r = web.post('/api/button-clicked', json={'buttonName': f'b{i}', 'userId': 'u1'})
                assert r.json == {'success': True}, r.data
            """,
            src_env,
        )
        assert done.returncode == 0, done.stderr
        assert sorted(e["properties"]["button_name"] for e in collector.events()) == ["b0", "b1", "b2"]


KLIME1_DJANGO_EXAMPLE = """
from django.http import JsonResponse
from django.views import View
from klime import KlimeClient

client = KlimeClient(write_key='your-write-key')

class ButtonClickView(View):
    def post(self, request):
        client.track('Button Clicked', {
            'button_name': request.POST.get('buttonName')
        }, user_id=str(request.user.id))

        return JsonResponse({'success': True})
"""


def test_klime1_django_example_runs_unchanged(src_env: dict, tmp_path: Path) -> None:
    pytest.importorskip("django")
    (tmp_path / "klime1_django_views.py").write_text(KLIME1_DJANGO_EXAMPLE)
    src_env["PYTHONPATH"] = str(tmp_path) + ":" + src_env["PYTHONPATH"]
    with Collector(write_key="your-write-key") as collector:
        src_env["KLIME_ENDPOINT"] = collector.url
        done = _run(
            """
            import django
            from django.conf import settings
            settings.configure(DEBUG=False, ALLOWED_HOSTS=['*'], SECRET_KEY='x', USE_TZ=True)
            django.setup()
            from types import SimpleNamespace
            from django.test import RequestFactory
            from klime1_django_views import ButtonClickView
            request = RequestFactory().post('/button', {'buttonName': 'Sign up'})
            request.user = SimpleNamespace(id=42)
            response = ButtonClickView.as_view()(request)
            assert response.status_code == 200, response.content
            """,
            src_env,
        )
        assert done.returncode == 0, done.stderr
        assert [(e["event"], e["userId"], e["properties"]) for e in collector.events()] == [
            ("Button Clicked", "42", {"button_name": "Sign up"})
        ]


# ------------------------------------------------------------------ 1.1.0's defects, not copied


def test_a_2xx_other_than_200_is_accepted_not_retried(collector: Collector) -> None:
    """klime 1.1.0 retried any 2xx but 200 (duplicates); klime 2 takes any 2xx as accepted."""
    collector.respond(Fault("status", status=202, body=b'{"status": "ok"}'))
    client = klime.KlimeClient(WRITE_KEY, collector.url)
    try:
        client.track("E", user_id="u")
        result = client.flush(timeout=10)
    finally:
        client.shutdown()
    assert len(collector.requests()) == 1
    assert result.sent == 1 and result.failed == 0


def test_a_datetime_property_does_not_lose_the_batch(collector: Collector) -> None:
    """klime 1.1.0: one datetime property made the 20th track() raise and lost the 19 good
    events beside it. klime 2 encodes datetimes (ISO 8601) and rejects what it cannot encode
    at the call, alone."""
    import datetime as dt

    client = klime.KlimeClient(WRITE_KEY, collector.url)
    try:
        for i in range(19):
            client.track("E", {"i": i}, "u")
        client.track("E", {"at": dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)}, "u")
        with pytest.raises(klime.ValidationError):
            client.track("E", {"bad": object()}, "u")
        assert client.flush(timeout=10).sent == 20
    finally:
        client.shutdown()
    assert collector.events()[-1]["properties"]["at"] == "2026-01-02T03:04:05Z"
