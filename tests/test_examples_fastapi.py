"""Smoke tests of examples/fastapi_app: the example's own tests (TestClient and the
``klime_events`` fixture), and the app under a real uvicorn on 127.0.0.1 serving concurrent
requests, then stopped with SIGTERM: every event arrives at the local collector, once."""

from __future__ import annotations

import collections
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from conftest import WRITE_KEY
from support.fd_server import FdServer

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app"


@pytest.fixture
def env(src_env: Dict[str, str], collector: Any) -> Dict[str, str]:
    return dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url, PYTHONUNBUFFERED="1")


def test_the_examples_own_tests_pass_without_sending(env, collector):
    pytest.importorskip("httpx")  # fastapi.testclient needs it (or httpx2)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_main.py"],
        cwd=EXAMPLE,
        env={k: v for k, v in env.items() if k != "KLIME_WRITE_KEY"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert collector.requests() == []


@pytest.fixture
def uvicorn_server(tmp_path: Path, env: Dict[str, str]) -> Iterator[FdServer]:
    argv = [sys.executable, "-m", "uvicorn", "main:app", "--fd", "{fd}", "--log-level", "warning"]
    server = FdServer(argv, cwd=EXAMPLE, env=env, log=tmp_path / "uvicorn.log")
    try:
        yield server
    finally:
        server.close()


def test_uvicorn_concurrent_requests_then_sigterm_deliver_everything(uvicorn_server, collector):
    server = uvicorn_server
    signups, upgrades = 40, 10

    def signup(i: int) -> Tuple[int, Any]:
        return server.request("POST", "/signup", {"user_id": f"u{i}", "plan": "pro"})

    def upgrade(i: int) -> Tuple[int, Any]:
        return server.request("GET", f"/upgrade?user_id=u{i}")

    with ThreadPoolExecutor(max_workers=10) as pool:
        queued = [pool.submit(signup, i) for i in range(signups)]
        awaited = [pool.submit(upgrade, i) for i in range(upgrades)]
        assert all(f.result() == (200, {"ok": True}) for f in queued), server.log.read_text()
        assert all(f.result() == (200, {"accepted": 1}) for f in awaited), server.log.read_text()

    # SIGTERM: uvicorn runs the lifespan's shutdown (ashutdown flushes), then re-raises the
    # signal, so the process ends killed by it (-15) without running atexit hooks.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM), server.log.read_text()

    expected = 2 * signups + upgrades
    assert collector.wait_for_events(expected, timeout=10), len(collector.events())
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == expected
    kinds = collections.Counter(e.get("event", e["type"]) for e in collector.events())
    assert kinds == {"identify": signups, "Signup": signups, "Plan Upgraded": upgrades}
    assert {e["userId"] for e in collector.events()} == {f"u{i}" for i in range(signups)}
    assert "Traceback" not in server.log.read_text()
