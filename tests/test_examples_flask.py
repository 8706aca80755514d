"""Smoke tests of examples/flask_app (an application factory using
klime.integrations.flask) and unit tests of klime.integrations.flask: the example's own
tests, Flask's test client and CLI in-process, and gunicorn serving ``shop:create_app()``
with two workers, each against the local collector on 127.0.0.1, counting messageIds."""

from __future__ import annotations

import collections
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

import klime
from conftest import WRITE_KEY
from support.fd_server import FdServer, gunicorn_options

flask = pytest.importorskip("flask")

from klime.integrations import flask as klime_flask  # noqa: E402

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flask_app"


@pytest.fixture
def shop() -> Iterator[Any]:
    """The example's package, imported from examples/flask_app."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        import shop

        yield shop
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m == "shop" or m.startswith("shop.")]:
            del sys.modules[name]


@pytest.fixture
def apps(collector: Any, shop: Any) -> Iterator[Any]:
    """``create_app`` pointed at the collector; every app's client is shut down afterwards."""
    made: List[Any] = []

    def make(**config: Any) -> Any:
        config = {"KLIME_WRITE_KEY": WRITE_KEY, "KLIME_ENDPOINT": collector.url, **config}
        app = shop.create_app(config)
        made.append(app)
        return app

    yield make
    for app in made:
        klime_flask.get_client(app).shutdown(timeout=2)


@pytest.fixture
def env(src_env: Dict[str, str], collector: Any) -> Dict[str, str]:
    return dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url, PYTHONUNBUFFERED="1")


# --------------------------------------------------------------------------- the example


def test_the_examples_own_tests_pass_without_sending(env, collector):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_shop.py"],
        cwd=EXAMPLE,
        env={k: v for k, v in env.items() if k != "KLIME_WRITE_KEY"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert collector.requests() == []  # the klime_events fixture captured everything


def test_test_client_against_the_collector(apps, collector):
    app = apps(KLIME_FLUSH_INTERVAL=600_000)  # nothing leaves before the explicit flush
    client = app.test_client()
    for i in range(5):
        assert client.post("/signup", json={"user_id": f"u{i}", "plan": "pro"}).json == {"ok": True}
    assert client.get("/upgrade", query_string={"user_id": "u0"}).json == {"accepted": 1}
    assert len(collector.events()) == 1  # the track_sync went at once; 10 are queued

    assert klime_flask.get_client(app).flush(timeout=10).sent == 10
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 11
    kinds = collections.Counter(e.get("event", e["type"]) for e in collector.events())
    assert kinds == {"identify": 5, "Signup": 5, "Plan Upgraded": 1}


def test_cli_send_test_event(apps, collector):
    result = apps().test_cli_runner().invoke(args=["send-test-event", "--count", "3", "--user-id", "ops"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "sent 3, failed 0, unsent 0"
    assert len(set(collector.message_ids())) == 3
    assert {(e["event"], e["userId"]) for e in collector.events()} == {("Test Event", "ops")}


def test_cli_send_test_event_fails_when_klime_refuses(apps, collector):
    result = apps(KLIME_WRITE_KEY="not-the-key").test_cli_runner().invoke(args=["send-test-event"])
    assert result.exit_code == 1
    assert "sent 0, failed 1, unsent 0" in result.output
    assert "not every event reached Klime" in result.output


@pytest.fixture
def gunicorn(tmp_path: Path, env: Dict[str, str]) -> Iterator[Any]:
    pytest.importorskip("gunicorn")
    started: List[FdServer] = []

    def start(*options: str, **extra_env: str) -> FdServer:
        argv = [sys.executable, "-m", "gunicorn", "shop:create_app()", "--bind", "fd://{fd}"]
        argv += ["--workers", "2", "--graceful-timeout", "20", "--log-level", "warning"]
        argv += [*gunicorn_options(), *options]
        log = tmp_path / f"gunicorn{len(started)}.log"
        server = FdServer(argv, cwd=EXAMPLE, env=dict(env, **extra_env), log=log)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def drive(server: FdServer, signups: int) -> None:
    for i in range(signups):
        status, body = server.request("POST", "/signup", {"user_id": f"u{i}", "plan": "pro"})
        assert (status, body) == (200, {"ok": True}), server.log.read_text()
    status, body = server.request("GET", "/upgrade?user_id=u0")
    assert (status, body) == (200, {"accepted": 1}), server.log.read_text()


def assert_arrived(collector: Any, signups: int) -> None:
    expected = 2 * signups + 1
    assert collector.wait_for_events(expected, timeout=15), len(collector.events())
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == expected
    kinds = collections.Counter(e.get("event", e["type"]) for e in collector.events())
    assert kinds == {"identify": signups, "Signup": signups, "Plan Upgraded": 1}


def test_gunicorn_two_workers_deliver_everything_by_sigterm(gunicorn, collector):
    # A long flush interval: what the workers queued can only arrive through their exit hooks.
    server = gunicorn(FLASK_KLIME_FLUSH_INTERVAL="600000")
    drive(server, signups=12)
    assert server.stop() == 0
    assert_arrived(collector, signups=12)


def test_gunicorn_flush_after_request_delivers_before_the_next_request(gunicorn, collector):
    server = gunicorn(FLASK_KLIME_FLUSH_INTERVAL="600000", FLASK_KLIME_FLUSH_AFTER_REQUEST="true")
    for i in range(6):
        assert server.request("POST", "/signup", {"user_id": f"u{i}"}) == (200, {"ok": True})
        # The response is out before the flush; the flush ends within the worker's next
        # moments, while the server keeps running.
        assert collector.wait_for_events(2 * (i + 1), timeout=10), server.log.read_text()
    assert len(set(collector.message_ids())) == 12
    assert server.stop() == 0
    assert len(collector.events()) == 12


# --------------------------------------------------------------------------- the integration


def test_init_app_reads_klime_keys_from_the_config(caplog_klime):
    app = flask.Flask("t")
    app.config.update(
        KLIME_WRITE_KEY="k",
        KLIME_TRANSPORT="memory",
        KLIME_MAX_BATCH_SIZE=7,
        KLIME_ENDPOINT=None,  # None: klime's own fallback
        KLIME_FLUSH_INTERVALL=5,  # a typo: warned about, ignored
    )
    client = klime_flask.init_app(app)
    try:
        assert klime_flask.get_client(app) is client and app.extensions["klime"] is client
        assert client.max_batch_size == 7 and client.transport.name == "memory"
        assert client.endpoint == "https://i.klime.com"
        assert "unknown Flask configuration key KLIME_FLUSH_INTERVALL" in caplog_klime.text
        with app.app_context():
            assert klime_flask.get_client() is client
    finally:
        client.shutdown()


def test_init_app_takes_a_client_and_refuses_a_second_call(make_client):
    app = flask.Flask("t")
    mine = make_client()
    assert klime_flask.init_app(app, mine) is mine
    with pytest.raises(klime.ConfigurationError, match="twice"):
        klime_flask.init_app(app, mine)
    with pytest.raises(klime.ConfigurationError, match=r"klime\.Client"):
        klime_flask.init_app(flask.Flask("u"), object())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config, message",
    [
        ({"KLIME_FLUSH_TIMEOUT": 0}, "positive"),
        ({"KLIME_FLUSH_TIMEOUT": "2"}, "number of seconds"),
        ({"KLIME_FLUSH_AFTER_REQUEST": "maybe"}, "true or false"),
        ({"KLIME_MAX_BATCH_SIZE": "20"}, "max_batch_size must be an integer"),
    ],
)
def test_init_app_rejects_bad_configuration(config, message):
    app = flask.Flask("t")
    app.config.update(KLIME_WRITE_KEY="k", KLIME_TRANSPORT="memory", **config)
    with pytest.raises(klime.ConfigurationError, match=message):
        klime_flask.init_app(app)
    assert "klime" not in app.extensions


def test_get_client_without_init_app():
    with pytest.raises(klime.ConfigurationError, match="init_app"):
        klime_flask.get_client(flask.Flask("t"))


def test_after_request_flush_runs_after_the_response_and_never_raises(make_client, collector, caplog_klime):
    app = flask.Flask("t")
    client = make_client(flush_interval=600_000)
    klime_flask.init_app(app, client, flush_after_request=True, flush_timeout=5)
    seen: List[int] = []

    @app.get("/")
    def index() -> str:
        client.track("Seen", user_id="u1")
        return "hi"

    response = app.test_client().get("/", buffered=False)
    seen.append(len(collector.events()))  # the body is not consumed yet: no flush so far
    assert response.get_data() == b"hi"
    response.close()  # what the WSGI server does once the body is sent
    assert seen == [0] and len(collector.events()) == 1

    def broken(timeout: Optional[float] = None) -> Any:
        raise RuntimeError("boom")

    client.flush = broken  # type: ignore[method-assign]
    with caplog_klime.at_level(logging.ERROR, logger="klime"):
        response = app.test_client().get("/")
        assert response.status_code == 200
        response.close()
    assert "the flush after a Flask response failed" in caplog_klime.text


def test_importing_klime_does_not_import_flask(src_env):
    code = "import sys, klime.integrations.flask; print('flask' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=src_env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_after_request_flush_that_times_out_warns_once(make_client, collector, caplog_klime):
    from klime._logging import log
    from klime.devserver import Fault

    log.reset_once("flask-after-request-unsent")  # a once-per-process warning
    app = flask.Flask("t")
    client = make_client(flush_interval=600_000)
    klime_flask.init_app(app, client, flush_after_request=True, flush_timeout=0.2)

    @app.get("/")
    def index() -> str:
        client.track("Seen", user_id="u1")
        return "hi"

    collector.set_mode(Fault.blackhole())  # Klime holds every request: each flush times out
    try:
        for _ in range(3):
            response = app.test_client().get("/")
            assert response.get_data() == b"hi"
            response.close()
        warnings = [
            r for r in caplog_klime.records if "still queued after a flush after a Flask" in r.message
        ]
        assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    finally:
        collector.set_mode(None)
    assert client.flush(timeout=10).unsent == 0  # nothing was lost: sent once Klime answers
    assert len(set(collector.message_ids())) == 3
