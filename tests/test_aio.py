"""Tests for klime._aio: awaitable flush/shutdown/*_sync (AsyncClientMixin) and the ASGI
lifespan helper, in-process and under a real uvicorn server on 127.0.0.1.

"The loop is never blocked" is shown by ordering, not by timing: the collector holds a
request (blackhole fault) for as long as the test wants, and the loop must keep serving
meanwhile; a heartbeat's largest gap is measured too and reported.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

import klime
from conftest import WRITE_KEY, Recorder, conserved, wait_until
from klime._aio import AsyncClientMixin
from klime.devserver import Collector, Fault
from klime.integrations.asgi import asgi_lifespan

# Until Client inherits the mixin itself, test it through a subclass.
AsyncClient: Any = (
    klime.Client
    if issubclass(klime.Client, AsyncClientMixin)
    else type("AsyncClient", (klime.Client, AsyncClientMixin), {})
)

QUEUE_FOREVER = 600_000  # ms: events stay queued until an explicit flush


@pytest.fixture
def make_async(collector: Collector) -> Iterator[Any]:
    made: List[Any] = []

    def make(**options: Any) -> Any:
        options.setdefault("endpoint", collector.url)
        options.setdefault("retry_initial_delay", 10)
        client = AsyncClient(options.pop("write_key", WRITE_KEY), **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown(timeout=2)


async def held_request(collector: Collector, n: int) -> None:
    """Wait (off the loop) until the collector has received ``n`` requests."""
    assert await asyncio.to_thread(collector.wait_for_requests, n, 10)


# --------------------------------------------------------------------------- the mixin


def test_aflush_sends_and_returns_the_result(make_async, collector):
    client = make_async(flush_interval=QUEUE_FOREVER)
    for i in range(5):
        client.track("Tick", {"i": i}, user_id="u1")

    result = asyncio.run(client.aflush(timeout=10))

    assert isinstance(result, klime.FlushResult) and result.sent == 5 and result.ok
    assert len(collector.events()) == 5


def test_aflush_does_not_block_the_loop(make_async, collector):
    """While the collector holds the flush's request, other tasks keep running."""
    client = make_async(flush_interval=QUEUE_FOREVER)
    client.track("Tick", user_id="u1")
    collector.respond(Fault.blackhole())

    async def main() -> klime.FlushResult:
        flush = asyncio.create_task(client.aflush(timeout=30))
        await held_request(collector, 1)
        for _ in range(20):  # the loop turns while the flush waits on the network
            await asyncio.sleep(0.005)
        assert not flush.done()
        collector.set_mode(None)  # release: the held request is reset, the retry succeeds
        return await flush

    result = asyncio.run(main())
    assert result.sent == 1 and result.ok
    assert [e["event"] for e in collector.events()] == ["Tick"]


def test_cancelled_aflush_keeps_flushing(make_async, collector, on_error):
    client = make_async(flush_interval=QUEUE_FOREVER, on_error=on_error)
    for i in range(3):
        client.track("Tick", {"i": i}, user_id="u1")
    collector.respond(Fault.blackhole())

    async def main() -> None:
        flush = asyncio.create_task(client.aflush())
        await held_request(collector, 1)
        flush.cancel()
        with pytest.raises(asyncio.CancelledError):
            await flush
        collector.set_mode(None)

    asyncio.run(main())  # asyncio.run also waits for the executor's threads
    assert collector.wait_for_events(3, timeout=10)
    assert sorted(e["properties"]["i"] for e in collector.events()) == [0, 1, 2]
    stats = client.stats()
    assert stats["sent"] == 3 and stats["queued"] == 0 and conserved(stats)
    assert on_error.calls == []


def test_wait_for_timeout_cancels_the_wait_not_the_flush(make_async, collector):
    client = make_async(flush_interval=QUEUE_FOREVER)
    client.track("Tick", user_id="u1")
    collector.respond(Fault.blackhole())

    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(client.aflush(), 0.05)
        collector.set_mode(None)

    asyncio.run(main())
    assert collector.wait_for_events(1, timeout=10)


def test_atrack_sync_and_friends_return_the_response(make_async, collector):
    client = make_async()

    async def main() -> List[klime.BatchResponse]:
        return [
            await client.atrack_sync("Signup", {"plan": "pro"}, user_id="u1"),
            await client.aidentify_sync("u1", {"email": "ada@example.com"}),
            await client.agroup_sync("org_1", {"name": "Acme"}, user_id="u1"),
            await client.atrack_sync("Usage", group_id="org_1", timeout=5),
        ]

    responses = asyncio.run(main())
    assert [(r.status, r.accepted, r.status_code) for r in responses] == [("ok", 1, 200)] * 4
    assert [e["type"] for e in collector.events()] == ["track", "identify", "group", "track"]
    assert collector.events()[2]["userId"] == "u1"


def test_concurrent_atrack_sync(make_async, collector):
    client = make_async()

    async def main() -> List[klime.BatchResponse]:
        return await asyncio.gather(*(client.atrack_sync("Tick", {"i": i}, user_id="u1") for i in range(30)))

    assert all(r.accepted == 1 for r in asyncio.run(main()))
    assert sorted(e["properties"]["i"] for e in collector.events()) == list(range(30))
    assert len(set(collector.message_ids())) == 30


def test_async_sync_calls_raise(make_async, collector):
    client = make_async(write_key="wrong-key")

    async def main() -> None:
        with pytest.raises(klime.SendError) as info:
            await client.atrack_sync("Signup", user_id="u1")
        assert info.value.status_code == 401
        assert info.value.events[0]["event"] == "Signup"
        with pytest.raises(klime.ValidationError):
            await client.atrack_sync("Signup")  # neither user_id nor group_id

    asyncio.run(main())


def test_cancelled_atrack_sync_still_delivers(make_async, collector, on_error):
    client = make_async(on_error=on_error)
    collector.respond(Fault.blackhole())

    async def main() -> None:
        send = asyncio.create_task(client.atrack_sync("Signup", user_id="u1"))
        await held_request(collector, 1)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        collector.set_mode(None)

    asyncio.run(main())
    assert collector.wait_for_events(1, timeout=10)
    assert collector.events()[0]["event"] == "Signup"
    assert wait_until(lambda: conserved(client.stats()) and client.stats()["sent"] == 1)
    assert on_error.calls == []


def test_cancelled_atrack_sync_that_fails_goes_to_on_error(make_async, collector):
    """Nobody is left to catch the SendError: it goes to on_error with the event."""
    on_error = Recorder()
    client = make_async(on_error=on_error)
    collector.respond(Fault.blackhole(), Fault.status_code(400))

    async def main() -> None:
        send = asyncio.create_task(client.atrack_sync("Signup", user_id="u1"))
        await held_request(collector, 1)
        send.cancel()
        with pytest.raises(asyncio.CancelledError):
            await send
        collector.set_mode(None)

    asyncio.run(main())
    assert wait_until(lambda: len(on_error.calls) == 1)
    error, events = on_error.calls[0]
    assert isinstance(error, klime.SendError) and error.status_code == 400
    assert [e["event"] for e in events] == ["Signup"]
    stats = client.stats()
    assert stats["failed"] == 1 and conserved(stats)


def test_cancelled_failure_without_on_error_is_logged(make_async, collector, caplog_klime):
    client = make_async()
    collector.respond(Fault.blackhole(), Fault.status_code(400))

    async def main() -> None:
        send = asyncio.create_task(client.aidentify_sync("u1"))
        await held_request(collector, 1)
        send.cancel()
        collector.set_mode(None)

    asyncio.run(main())
    assert wait_until(lambda: "aidentify_sync() (its awaiter was cancelled)" in caplog_klime.text)
    assert WRITE_KEY not in caplog_klime.text


def test_ashutdown_flushes_and_is_idempotent(make_async, collector, caplog_klime):
    client = make_async(flush_interval=QUEUE_FOREVER)
    for i in range(4):
        client.track("Tick", {"i": i}, user_id="u1")

    async def main() -> List[klime.FlushResult]:
        first = await client.ashutdown(timeout=10)
        client.track("After", user_id="u1")  # a no-op after shutdown
        return [first, await client.ashutdown()]

    first, second = asyncio.run(main())
    assert first.sent == 4 and first.ok
    assert second == klime.FlushResult()
    assert [e["event"] for e in collector.events()] == ["Tick"] * 4


# --------------------------------------------------------------------------- lifespan


class Server:
    """Drives the ASGI lifespan protocol the way a server does (for in-process tests)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.to_app: asyncio.Queue[Dict[str, Any]] = asyncio.Queue()
        self.from_app: asyncio.Queue[Dict[str, Any]] = asyncio.Queue()
        self.task: Optional[asyncio.Task[None]] = None

    async def _receive(self) -> Dict[str, Any]:
        return await self.to_app.get()

    async def _send(self, message: Dict[str, Any]) -> None:
        await self.from_app.put(dict(message))

    async def startup(self) -> str:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self.task = asyncio.create_task(self.app(scope, self._receive, self._send))
        await self.to_app.put({"type": "lifespan.startup"})
        return await self._answer()

    async def shutdown(self) -> str:
        await self.to_app.put({"type": "lifespan.shutdown"})
        return await self._answer()

    async def _answer(self) -> str:
        message = await asyncio.wait_for(self.from_app.get(), 20)
        return str(message["type"])

    async def finished(self) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, 20)


def lifespan_app(client: Any, *, fail_startup: bool = False) -> Any:
    """A raw ASGI app that speaks lifespan and tracks an event in its shutdown handler."""

    async def app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if fail_startup:
                    await send({"type": "lifespan.startup.failed", "message": "no database"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                client.track("Server Stopped", user_id="ops")
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


def test_lifespan_flushes_after_the_apps_own_shutdown(make_client, collector):
    """The event tracked by the app's shutdown handler has arrived by the time the server
    hears shutdown.complete."""
    client = make_client(flush_interval=QUEUE_FOREVER)
    wrapped = asgi_lifespan(lifespan_app(client), client)

    async def main() -> List[str]:
        server = Server(wrapped)
        answers = [await server.startup()]
        client.track("Request", user_id="u1")
        answers.append(await server.shutdown())
        assert sorted(e["event"] for e in collector.events()) == ["Request", "Server Stopped"]
        await server.finished()
        return answers

    assert asyncio.run(main()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert client.stats()["queued"] == 0
    client.track("Still Open", user_id="u1")  # flushed, not shut down: the client lives on
    assert client.flush(timeout=10).sent == 1


@pytest.mark.parametrize("style", ["raises", "returns"])
def test_lifespan_answered_for_apps_without_it(make_client, collector, style):
    """Django's ASGI handler raises on the lifespan scope; some apps just return."""
    client = make_client(flush_interval=QUEUE_FOREVER)

    async def http_only(scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if style == "raises":
                raise ValueError("Django can only handle ASGI/HTTP connections, not lifespan.")
            return

    async def main() -> List[str]:
        server = Server(asgi_lifespan(http_only, client))
        answers = [await server.startup()]
        client.track("Request", user_id="u1")
        answers.append(await server.shutdown())
        assert [e["event"] for e in collector.events()] == ["Request"]
        await server.finished()
        return answers

    assert asyncio.run(main()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_lifespan_startup_failure_is_passed_on(make_client, collector):
    client = make_client()

    async def main() -> List[str]:
        server = Server(asgi_lifespan(lifespan_app(client, fail_startup=True), client))
        answer = await server.startup()
        await server.finished()
        return [answer]

    assert asyncio.run(main()) == ["lifespan.startup.failed"]


def test_lifespan_uses_the_default_client_and_can_shut_it_down(collector):
    klime.client = klime.Client(WRITE_KEY, endpoint=collector.url, flush_interval=QUEUE_FOREVER)
    klime.track("Request", user_id="u1")

    async def main() -> None:
        server = Server(asgi_lifespan(lifespan_app(klime.get_client()), shutdown=True, timeout=10))
        await server.startup()
        assert await server.shutdown() == "lifespan.shutdown.complete"
        await server.finished()

    asyncio.run(main())
    assert sorted(e["event"] for e in collector.events()) == ["Request", "Server Stopped"]
    assert "closed" in repr(klime.client)


def test_lifespan_without_any_client_does_nothing():
    async def main() -> List[str]:
        server = Server(asgi_lifespan(lifespan_app(klime.Client("k", transport="memory"))))
        return [await server.startup(), await server.shutdown()]

    assert klime.client is None
    assert asyncio.run(main()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert klime.client is None  # no default client was created just to flush it


def test_lifespan_flush_failure_never_fails_the_shutdown(caplog_klime):
    class Broken:
        exit_timeout = 1.0

        def flush(self, timeout: Optional[float] = None) -> Any:
            raise RuntimeError("broken")

        def track(self, *args: Any, **kwargs: Any) -> None:
            pass

    broken = Broken()

    async def main() -> str:
        server = Server(asgi_lifespan(lifespan_app(broken), broken))
        await server.startup()
        return await server.shutdown()

    assert asyncio.run(main()) == "lifespan.shutdown.complete"
    assert "the ASGI lifespan flush failed" in caplog_klime.text


def test_other_scopes_pass_straight_through():
    seen: List[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    async def receive() -> Dict[str, Any]:
        return {}

    async def send(message: Any) -> None:
        pass

    scope = {"type": "http", "path": "/"}
    asyncio.run(asgi_lifespan(app)(scope, receive, send))
    assert seen == [(scope, receive, send)]
    with pytest.raises(TypeError):
        asgi_lifespan("not an app")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- uvicorn

APP = textwrap.dedent(
    """
    import asyncio, json, os, time
    from urllib.parse import parse_qs

    import klime
    from klime._aio import AsyncClientMixin
    from klime.integrations.asgi import asgi_lifespan

    if issubclass(klime.Client, AsyncClientMixin):
        AsyncClient = klime.Client
    else:
        class AsyncClient(klime.Client, AsyncClientMixin):
            pass

    client = AsyncClient(
        flush_interval=600_000,        # nothing leaves before an explicit flush
        max_batch_size=100,
        retry_initial_delay=10,
        flush_on_shutdown=False,       # so exit would DROP what the lifespan did not flush
    )
    state = {"max_gap": 0.0, "beats": 0}


    async def heartbeat():
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(0.005)
            now = loop.time()
            state["max_gap"] = max(state["max_gap"], now - last)
            state["beats"] += 1
            last = now


    async def reply(send, payload, status=200):
        body = json.dumps(payload).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            task = None
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    task = asyncio.ensure_future(heartbeat())
                    await send({"type": "lifespan.startup.complete"})
                else:
                    task.cancel()
                    client.track("Server Stopped", user_id="ops")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        path = scope["path"]
        if path == "/track":
            client.track("Page Viewed", {"i": int(query["i"])}, user_id=query["u"])
            await reply(send, {"ok": True})
        elif path == "/track_sync":
            response = await client.atrack_sync("Checkout", {"i": int(query["i"])}, user_id=query["u"])
            await reply(send, {"accepted": response.accepted})
        elif path == "/flush":
            started = time.monotonic()
            result = await client.aflush(timeout=30)
            await reply(send, {"sent": result.sent, "unsent": result.unsent,
                               "seconds": time.monotonic() - started})
        elif path == "/stats":
            if query.get("reset"):
                state["max_gap"] = 0.0
            await reply(send, dict(state, **client.stats()))
        else:
            await reply(send, {"error": "not found"}, 404)


    app = asgi_lifespan(app, client)
    """
)

RUNNER = textwrap.dedent(
    """
    import os, socket, sys
    import uvicorn

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from klime_asgi_app import app

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(sock.getsockname()[1]))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    config = uvicorn.Config(app, lifespan="on", log_level="warning", timeout_graceful_shutdown=20)
    uvicorn.Server(config).run(sockets=[sock])
    """
)


class Uvicorn:
    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.process = process
        self.port = port
        self.log = log

    def get(self, path: str, timeout: float = 30) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body)
            return json.loads(body)
        finally:
            conn.close()


@pytest.fixture
def uvicorn_server(tmp_path: Path, collector: Collector, src_env: Dict[str, str]) -> Iterator[Uvicorn]:
    pytest.importorskip("uvicorn")
    (tmp_path / "klime_asgi_app.py").write_text(APP)
    (tmp_path / "run.py").write_text(RUNNER)
    port_file = tmp_path / "port"
    log = tmp_path / "uvicorn.log"
    env = dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url)
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(tmp_path / "run.py"), str(port_file)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        assert wait_until(lambda: port_file.exists() or process.poll() is not None, timeout=30)
        assert process.poll() is None, log.read_text()
        server = Uvicorn(process, int(port_file.read_text()), log)
        assert wait_until(lambda: _answers(server), timeout=30), log.read_text()
        yield server
    finally:
        collector.set_mode(None)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(server: Uvicorn) -> bool:
    try:
        server.get("/stats", timeout=2)
        return True
    except OSError:
        return False


def test_uvicorn_concurrent_requests_flush_off_the_loop_and_at_lifespan_shutdown(uvicorn_server, collector):
    server = uvicorn_server

    # 1. Concurrent requests: 40 tracks (queued) and 10 awaited sends (delivered at once).
    with ThreadPoolExecutor(max_workers=12) as pool:
        tracks = [pool.submit(server.get, f"/track?u=u{i % 5}&i={i}") for i in range(40)]
        syncs = [pool.submit(server.get, f"/track_sync?u=u{i}&i={i}") for i in range(10)]
        assert all(f.result()["ok"] for f in tracks)
        assert all(f.result()["accepted"] == 1 for f in syncs)
    assert sorted(e["properties"]["i"] for e in collector.events()) == list(range(10))
    assert server.get("/stats")["queued"] == 40

    # 2. A flush the collector holds: the server keeps answering while it waits.
    requests_before = len(collector.requests())
    collector.respond(Fault.blackhole())
    server.get("/stats?reset=1")
    with ThreadPoolExecutor(max_workers=1) as pool:
        flush = pool.submit(server.get, "/flush")
        assert collector.wait_for_requests(requests_before + 1, timeout=20)
        held_since = time.monotonic()
        beats = server.get("/stats")["beats"]
        answered = 1
        while time.monotonic() - held_since < 1.0:  # hold the flush for a second
            server.get("/stats")
            answered += 1
            time.sleep(0.01)  # pacing, not waiting: keep the load modest on a shared machine
            assert not flush.done()  # nothing can finish it before the release below
        stats = server.get("/stats")
        held = time.monotonic() - held_since
        assert stats["beats"] > beats  # the heartbeat task kept running all along
        collector.set_mode(None)
        flushed = flush.result(timeout=30)
    assert flushed["sent"] == 40 and flushed["unsent"] == 0 and flushed["seconds"] >= held
    print(
        f"\nflush held {held:.2f}s (whole flush {flushed['seconds']:.2f}s); {answered} requests "
        f"answered meanwhile; heartbeat max gap {stats['max_gap'] * 1000:.1f} ms"
    )
    # Generous bound: a blocked loop would show a gap of the whole hold (>= 1 s).
    assert stats["max_gap"] < held / 2

    # 3. Lifespan: events still queued at shutdown are flushed by the lifespan helper
    # (exit would drop them: flush_on_shutdown=False), the app's own shutdown event too.
    for i in range(40, 45):
        server.get(f"/track?u=u1&i={i}")
    server.process.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert server.process.wait(timeout=30) in (0, -signal.SIGTERM), server.log.read_text()
    assert "Error" not in server.log.read_text(), server.log.read_text()
    page_views = sorted(e["properties"]["i"] for e in collector.events() if e["event"] == "Page Viewed")
    assert page_views == list(range(45))
    assert [e["event"] for e in collector.events()].count("Server Stopped") == 1
    assert len(set(collector.message_ids())) == len(collector.events()) == 56
