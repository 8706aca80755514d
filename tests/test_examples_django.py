"""Smoke tests of examples/django_app: the real Django project, run the ways users run it
(``manage.py test``, ``manage.py send_test_event``, gunicorn ``--preload`` with two workers,
uvicorn on the ASGI entry point), each against the local collector on 127.0.0.1, counting the
events that arrived by messageId."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from conftest import WRITE_KEY
from support.fd_server import FdServer as Server
from support.fd_server import gunicorn_options

pytest.importorskip("django")

PROJECT = Path(__file__).resolve().parent.parent / "examples" / "django_app"


@pytest.fixture
def env(src_env: Dict[str, str], collector: Any) -> Dict[str, str]:
    return dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url, PYTHONUNBUFFERED="1")


def manage(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def serve(tmp_path: Path, env: Dict[str, str]) -> Iterator[Any]:
    started: List[Server] = []

    def start(*argv: str) -> Server:
        server = Server(list(argv), cwd=PROJECT, env=env, log=tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def drive(server: Server, signups: int, upgrades: int) -> None:
    """POST /signup (2 events queued each) and GET /upgrade (1 event sent before answering)."""
    for i in range(signups):
        status, body = server.request("POST", "/signup", form={"user_id": f"u{i}", "plan": "pro"})
        assert (status, body) == (200, {"ok": True}), server.log.read_text()
    for i in range(upgrades):
        status, body = server.request("GET", f"/upgrade?user_id=u{i}")
        assert (status, body) == (200, {"accepted": 1}), server.log.read_text()


def assert_arrived(collector: Any, signups: int, upgrades: int) -> None:
    expected = 2 * signups + upgrades
    assert collector.wait_for_events(expected, timeout=15), len(collector.events())
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == expected  # every event once, nothing twice
    kinds = collections.Counter(e.get("event", e["type"]) for e in collector.events())
    assert kinds == {"identify": signups, "Signup": signups, "Plan Upgraded": upgrades}


def test_manage_py_test_runs_the_examples_tests_without_sending(env, collector):
    result = manage(env, "test", "-v", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Ran 3 tests" in result.stderr and "OK" in result.stderr
    assert collector.requests() == []  # klime.testing captured everything


def test_send_test_event_command(env, collector):
    result = manage(env, "send_test_event", "--count", "3", "--user-id", "ops")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "sent 3, failed 0, unsent 0"
    events = collector.events()
    assert len(set(collector.message_ids())) == len(events) == 3
    assert sorted(e["properties"]["n"] for e in events) == [0, 1, 2]
    assert {(e["event"], e["userId"]) for e in events} == {("Test Event", "ops")}


def test_send_test_event_command_fails_when_klime_refuses(env, collector):
    result = manage(dict(env, KLIME_WRITE_KEY="not-the-key"), "send_test_event")
    assert result.returncode == 1
    assert "sent 0, failed 1, unsent 0" in result.stdout
    assert "CommandError: not every event reached Klime" in result.stderr
    assert "not-the-key" not in result.stdout + result.stderr


def test_missing_write_key_fails_at_startup(env):
    env = dict(env)
    del env["KLIME_WRITE_KEY"]
    result = manage(env, "check")
    assert result.returncode == 1
    assert "ConfigurationError: write_key is required" in result.stderr


def test_gunicorn_preload_two_workers_deliver_everything_by_sigterm(serve, collector):
    pytest.importorskip("gunicorn")
    server = serve(
        sys.executable, "-m", "gunicorn", "mysite.wsgi", "--preload", "--workers", "2",
        "--bind", "fd://{fd}", "--graceful-timeout", "20", "--log-level", "warning",
        *gunicorn_options(),
    )  # fmt: skip
    drive(server, signups=12, upgrades=3)
    assert server.stop() == 0
    assert_arrived(collector, signups=12, upgrades=3)


def test_asgi_under_uvicorn_flushes_at_lifespan_shutdown(serve, collector):
    pytest.importorskip("uvicorn")
    server = serve(
        sys.executable, "-m", "uvicorn", "mysite.asgi:application", "--fd", "{fd}",
        "--lifespan", "on", "--log-level", "warning",
    )  # fmt: skip
    drive(server, signups=8, upgrades=2)
    assert server.stop() in (0, -signal.SIGTERM), server.log.read_text()
    assert_arrived(collector, signups=8, upgrades=2)
    assert "lifespan" not in server.log.read_text().lower()  # no lifespan error from Django
