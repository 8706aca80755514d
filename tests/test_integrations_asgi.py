"""klime.integrations.asgi: flush after each HTTP request and at lifespan shutdown.

Driven directly (an ASGI app is a coroutine function, which is all a server calls) and once
under a real uvicorn. Clients use a 60 s flush interval: what arrives quickly was flushed
by the middleware.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest

import klime
from apps.process import servers
from apps.process.servers import Ledger, Server
from conftest import WRITE_KEY
from klime.devserver import Collector
from klime.integrations.asgi import KlimeASGIMiddleware


def http_scope(path: str = "/") -> Dict[str, Any]:
    return {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}


def drive(app: Any, scope: Dict[str, Any], messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Run one ASGI call to completion; return what the app sent."""
    sent: List[Dict[str, Any]] = []
    incoming = list(messages)

    async def receive() -> Dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_flush_after_each_request_off_the_event_loop(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    client = make_client(flush_interval=60_000)
    loop_threads: List[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        loop_threads.append(threading.current_thread().name)
        client.track("Request", user_id="user-1")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    middleware = KlimeASGIMiddleware(app, client=client, flush=True)
    sent = drive(middleware, http_scope(), [{"type": "http.request", "body": b""}])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert collector.wait_for_events(1, 10)
    assert client.stats()["queued"] == 0


def test_flushes_when_the_app_raises(collector: Collector, make_client: Callable[..., klime.Client]) -> None:
    client = make_client(flush_interval=60_000)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        client.track("Before Failure", user_id="user-1")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        drive(KlimeASGIMiddleware(app, flush=True), http_scope(), [])
    assert collector.wait_for_events(1, 10)


def test_lifespan_shutdown_flushes_before_the_app_hears_of_it(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    client = make_client(flush_interval=60_000)
    seen_at_shutdown: List[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                client.track("Started", user_id="user-1")
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                seen_at_shutdown.append(len(collector.events()))
                await send({"type": "lifespan.shutdown.complete"})
                return

    sent = drive(
        KlimeASGIMiddleware(app, flush=False),
        {"type": "lifespan"},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert seen_at_shutdown == [1]


def test_no_flush_by_default_where_the_thread_sends(make_client: Callable[..., klime.Client]) -> None:
    client = make_client(flush_interval=60_000)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        client.track("Request", user_id="user-1")

    drive(KlimeASGIMiddleware(app, client=client), http_scope(), [])
    assert client.stats()["queued"] == 1


def run_uvicorn(tmp_path: Path, flush: bool) -> Tuple[Dict[str, Any], Any, Any]:
    """Serve apps.process.asgi_app with uvicorn, send 4 requests, stop it with SIGTERM.

    Returns what had arrived before the stop, the delivery check and the exit code.
    """
    pytest.importorskip("uvicorn")
    ledger = Ledger(tmp_path / "ledger")
    port = servers.free_port()
    with Collector(write_key=WRITE_KEY) as collector:
        env = servers.app_env(
            collector, ledger, KLIME_TEST_FLUSH_INTERVAL="60000", KLIME_TEST_ASGI_FLUSH="1" if flush else "0"
        )
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "apps.process.asgi_app:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--lifespan",
            "on",
            "--log-level",
            "warning",
        ]
        with Server(argv, env, tmp_path / "uvicorn.log", port) as server:
            assert servers.wait_for(lambda: _answers(server), 30, interval=0.05), server.log()
            for _ in range(4):
                server.get("/track?n=3")
            produced = len(ledger.produced())
            if flush:
                assert collector.wait_for_events(produced, 10), server.log()
            before = {"produced": produced, "arrived": len(collector.events())}
            code = server.stop(signal.SIGTERM)
        return before, servers.check_delivery(collector, ledger, timeout=2), code


def test_under_uvicorn_each_request_is_flushed(tmp_path: Path) -> None:
    before, d, code = run_uvicorn(tmp_path, flush=True)
    assert before["produced"] >= 13 and before["arrived"] == before["produced"]
    assert not d.missing and not d.duplicated and not d.unexpected, d.describe()
    # uvicorn re-raises SIGTERM after its graceful shutdown: the process dies of it
    assert code in (0, -signal.SIGTERM)


def test_under_uvicorn_lifespan_shutdown_flushes(tmp_path: Path) -> None:
    """uvicorn ends by re-raising SIGTERM, so Python's atexit never runs: the lifespan
    shutdown flush is what delivers the events still queued."""
    before, d, code = run_uvicorn(tmp_path, flush=False)
    assert before["arrived"] == 0
    assert not d.missing and not d.duplicated and not d.unexpected, d.describe()
    assert code in (0, -signal.SIGTERM)


def _answers(server: Server) -> bool:
    try:
        server.get("/track?n=1", timeout=2)
        return True
    except OSError:
        return False
