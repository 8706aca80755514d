"""klime.integrations.wsgi: the per-request flush, under a real WSGI server (wsgiref).

Clients use a 60 s flush interval, so an event that arrives quickly was sent by the
middleware's flush and not by the background thread.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable, Iterator, List
from wsgiref.simple_server import WSGIRequestHandler, make_server

import pytest

import klime
from klime.devserver import Collector
from klime.integrations.wsgi import KlimeMiddleware, should_flush


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """Serve a WSGI app on 127.0.0.1 in a thread; return its base URL."""
    servers: List[Any] = []

    def start(app: Any) -> str:
        server = make_server("127.0.0.1", 0, app, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


class Body:
    """A response body that records whether the server closed it."""

    def __init__(self, chunks: List[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def close(self) -> None:
        self.closed = True


def tracking_app(client: klime.Client, bodies: List[Body]) -> Callable[..., Iterable[bytes]]:
    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/boom":
            client.track("Before Failure", user_id="user-1")
            raise RuntimeError("boom")
        client.track("Request", {"path": environ["PATH_INFO"]}, user_id="user-1")
        body = Body([b'{"ok": true}'])
        bodies.append(body)
        start_response("200 OK", [("Content-Type", "application/json")])
        return body

    return app


def test_flush_after_each_response(
    collector: Collector, make_client: Callable[..., klime.Client], serve: Any
) -> None:
    client = make_client(flush_interval=60_000)
    bodies: List[Body] = []
    url = serve(KlimeMiddleware(tracking_app(client, bodies), client=client, flush=True))
    for i in range(3):
        assert get(f"{url}/page-{i}") == {"ok": True}
        assert collector.wait_for_events(i + 1, 10)
    assert all(b.closed for b in bodies)  # the app's own close() still runs
    assert client.stats()["queued"] == 0


def test_flushes_what_a_failing_request_tracked(
    collector: Collector, make_client: Callable[..., klime.Client], serve: Any
) -> None:
    client = make_client(flush_interval=60_000)
    url = serve(KlimeMiddleware(tracking_app(client, []), client=client, flush=True))
    with pytest.raises(urllib.error.HTTPError):
        get(f"{url}/boom")
    assert collector.wait_for_events(1, 10)
    assert collector.events()[0]["event"] == "Before Failure"


def test_without_a_client_flushes_every_live_client(
    collector: Collector, make_client: Callable[..., klime.Client], serve: Any
) -> None:
    first, second = make_client(flush_interval=60_000), make_client(flush_interval=60_000)

    def app(environ: Any, start_response: Any) -> Iterable[bytes]:
        first.track("One", user_id="user-1")
        second.track("Two", user_id="user-1")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    url = serve(KlimeMiddleware(app, flush=True))
    get(url)
    assert collector.wait_for_events(2, 10)
    assert sorted(e["event"] for e in collector.events()) == ["One", "Two"]


def test_by_default_no_flush_where_the_thread_sends(
    collector: Collector, make_client: Callable[..., klime.Client], serve: Any
) -> None:
    assert should_flush(None) is False  # not under uWSGI without threads
    client = make_client(flush_interval=60_000)
    bodies: List[Body] = []
    url = serve(KlimeMiddleware(tracking_app(client, bodies), client=client))
    get(f"{url}/x")
    assert bodies[0].closed
    assert client.stats()["queued"] == 1  # left to the background thread
    assert should_flush(True) is True and should_flush(False) is False


def test_a_dead_endpoint_costs_at_most_the_timeout(
    make_client: Callable[..., klime.Client], serve: Any
) -> None:
    with Collector() as dead:
        endpoint = dead.url
    client = make_client(endpoint=endpoint, flush_interval=60_000, retry_initial_delay=200)
    bodies: List[Body] = []
    url = serve(KlimeMiddleware(tracking_app(client, bodies), client=client, flush=True, timeout=0.5))
    assert get(f"{url}/x") == {"ok": True}  # the response is not held by the flush
