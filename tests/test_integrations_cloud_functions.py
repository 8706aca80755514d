"""@klime_cloud_function (src/klime/integrations/cloud_functions.py).

First in this process (deadline from FUNCTION_TIMEOUT_SEC, async functions stay async,
outcomes unchanged), then under the real functions-framework serving
tests/apps/serverless/cf_app.py through gunicorn (not --debug: the module is imported in
the master, which forks the worker), for HTTP, CloudEvent and async (--asgi) functions:
every event a call tracked must be at the collector before its HTTP response arrives.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import klime
from conftest import WRITE_KEY
from klime import InvocationTransport, klime_cloud_function
from klime.devserver import Collector, Fault
from support.arrivals import arrivals

APPS = Path(__file__).resolve().parent / "apps" / "serverless"
SRC = Path(__file__).resolve().parent.parent / "src"


class SpyTransport(InvocationTransport):
    def __init__(self, **options):
        super().__init__(**options)
        self.flush_timeouts = []

    def flush(self, timeout=None):
        self.flush_timeouts.append(timeout)
        return super().flush(timeout)


# ---------------------------------------------------------------------------------------
# In this process


def test_flush_bounded_by_function_timeout(make_client, monkeypatch):
    spy = SpyTransport()
    client = make_client(transport=spy)

    @klime_cloud_function(client=client, flush_timeout=30, deadline_margin=0.5)
    def fn(request):
        return "ok"

    monkeypatch.setenv("FUNCTION_TIMEOUT_SEC", "2")
    assert fn(object()) == "ok"
    assert 0 < spy.flush_timeouts[-1] <= 1.5

    monkeypatch.delenv("FUNCTION_TIMEOUT_SEC")
    monkeypatch.setenv("CLOUD_RUN_TIMEOUT_SECONDS", "1")
    fn(object())
    assert 0 < spy.flush_timeouts[-1] <= 0.5

    monkeypatch.setenv("CLOUD_RUN_TIMEOUT_SECONDS", "0")  # functions-framework's "no timeout"
    fn(object())
    assert 29 < spy.flush_timeouts[-1] <= 30


def test_bare_with_the_default_client(monkeypatch, collector):
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    monkeypatch.setenv("FUNCTION_TARGET", "fn")

    @klime_cloud_function
    def fn(cloud_event):
        klime.track("Bare CF", user_id="u")

    assert fn({"id": "1"}) is None
    assert klime.client.transport.name == "invocation"
    assert [e["event"] for e in collector.events()] == ["Bare CF"]


def test_exception_passes_through_after_the_flush(make_client, collector):
    client = make_client(transport="invocation")
    error = LookupError("mine")

    @klime_cloud_function(client=client)
    def fn(request):
        client.track("Before Error", user_id="u")
        raise error

    with pytest.raises(LookupError) as info:
        fn(object())
    assert info.value is error
    assert len(collector.events()) == 1


def test_async_function_stays_async_and_flushes_off_the_loop(make_client, collector):
    flush_threads = []

    class Recording(InvocationTransport):
        def flush(self, timeout=None):
            flush_threads.append(threading.current_thread())
            return super().flush(timeout)

    client = make_client(transport=Recording())

    @klime_cloud_function(client=client)
    async def fn(request):
        await asyncio.sleep(0)
        client.track("Async CF", user_id="u")
        return {"ok": True}

    assert inspect.iscoroutinefunction(fn)

    async def main():
        return await fn(object()), threading.current_thread()

    result, loop_thread = asyncio.run(main())
    assert result == {"ok": True}
    assert len(collector.events()) == 1
    assert flush_threads and flush_threads[0] is not loop_thread


# ---------------------------------------------------------------------------------------
# Under the real functions-framework

requires_ff = pytest.mark.skipif(
    importlib.util.find_spec("functions_framework") is None, reason="functions-framework is not installed"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FunctionServer:
    """``python -m functions_framework`` on 127.0.0.1 in its own process group."""

    def __init__(self, target: str, *, collector: Collector, args=(), env=None) -> None:
        self.port = _free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="klime-ff-", suffix=".log", delete=False)
        environment = dict(os.environ)
        for name in ("AWS_LAMBDA_FUNCTION_NAME", "FUNCTION_TIMEOUT_SEC", "CLOUD_RUN_TIMEOUT_SECONDS"):
            environment.pop(name, None)
        environment.update(
            {
                "KLIME_WRITE_KEY": WRITE_KEY,
                "KLIME_ENDPOINT": collector.url,
                "PYTHONPATH": os.pathsep.join([str(SRC), str(APPS), environment.get("PYTHONPATH", "")]),
                "PYTHONUNBUFFERED": "1",
                "WORKERS": "1",
            }
        )
        environment.update(env or {})
        command = [
            *(sys.executable, "-m", "functions_framework", "--target", target),
            *("--source", str(APPS / "cf_app.py"), "--host", "127.0.0.1", "--port", str(self.port)),
            *args,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=str(APPS),
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"functions-framework exited with {code}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"functions-framework did not listen within {timeout}s:\n{self.output()}")

    def output(self) -> str:
        try:
            with open(self.log.name, "rb") as f:
                return f.read()[-20_000:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # the worker too, whatever happened
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=10)
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def shared_collector():
    with Collector(write_key=WRITE_KEY) as collector:
        yield collector


@pytest.fixture(scope="module")
def servers(shared_collector):
    """One server per signature, started together (they start in parallel), always stopped."""
    if importlib.util.find_spec("functions_framework") is None:
        pytest.skip("functions-framework is not installed")
    timeout_env = {"FUNCTION_TIMEOUT_SEC": "2", "KLIME_TEST_MARGIN": "0.8"}
    started = {}
    try:
        started["http"] = FunctionServer("http_fn", collector=shared_collector, env=timeout_env)
        started["event"] = FunctionServer(
            "event_fn", collector=shared_collector, args=["--signature-type", "cloudevent"]
        )
        started["async"] = FunctionServer("async_http_fn", collector=shared_collector, args=["--asgi"])
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture
def collector_state(shared_collector):
    shared_collector.set_mode(None)
    yield shared_collector
    shared_collector.set_mode(None)


def call(url: str, *, data: bytes | None = None, headers=None, timeout: float = 30.0):
    """One request; returns (status, parsed body or text, monotonic time of the response)."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    answered = time.monotonic()
    try:
        return status, json.loads(body), answered
    except ValueError:
        return status, body.decode("utf-8", "replace"), answered


def assert_arrived_before(collector, tag, n, answered):
    got = arrivals(collector, tag)
    assert len(got) == len({m for m, _ in got}) == n, f"{tag}: {len(got)} of {n} events arrived"
    assert all(at <= answered for _, at in got), f"{tag}: events arrived after the response"


@requires_ff
def test_http_function_sends_before_responding(servers, collector_state):
    server = servers["http"]
    pids = set()
    for tag, n in (("http-1", 1), ("http-45", 45)):
        status, body, answered = call(f"{server.url}/?tag={tag}&n={n}")
        assert status == 200, server.output()
        assert body["transport"] == "invocation"
        assert body["pid"] != server.process.pid, "served by the forked worker"
        pids.add(body["pid"])
        assert_arrived_before(collector_state, tag, n, answered)
    assert len(pids) == 1


@requires_ff
def test_http_function_that_raises_still_sends(servers, collector_state):
    server = servers["http"]
    status, _, answered = call(f"{server.url}/?tag=http-raise&n=4&raise=1")
    assert status == 500
    assert_arrived_before(collector_state, "http-raise", 4, answered)
    assert "function failed: http-raise" in server.output()


@requires_ff
def test_http_function_deadline_from_function_timeout(servers, collector_state):
    server = servers["http"]  # FUNCTION_TIMEOUT_SEC=2, deadline_margin 0.8
    collector_state.set_mode(Fault.blackhole())
    started = time.monotonic()
    status, body, answered = call(f"{server.url}/?tag=cf-cut&n=30")
    assert status == 200
    assert answered - started < 2.0, "the response must come before the function's timeout"
    assert arrivals(collector_state, "cf-cut") == []

    collector_state.set_mode(None)
    status, body, answered = call(f"{server.url}/?tag=cf-next&n=1")
    assert status == 200 and body["stats"]["queued"] == 31
    assert_arrived_before(collector_state, "cf-cut", 30, answered)
    assert_arrived_before(collector_state, "cf-next", 1, answered)


@requires_ff
def test_cloudevent_function_sends_before_responding(servers, collector_state):
    server = servers["event"]
    headers = {
        "Content-Type": "application/json",
        "ce-id": "event-1",
        "ce-source": "//klime/tests",
        "ce-type": "com.klime.test",
        "ce-specversion": "1.0",
    }
    for tag, n in (("ce-3", 3), ("ce-25", 25)):
        data = json.dumps({"tag": tag, "n": n}).encode()
        status, _, answered = call(server.url, data=data, headers=headers)
        assert status == 200, server.output()
        assert_arrived_before(collector_state, tag, n, answered)


@requires_ff
def test_async_function_under_asgi_sends_before_responding(servers, collector_state):
    server = servers["async"]
    status, body, answered = call(f"{server.url}/?tag=async-cf&n=30")
    assert status == 200, server.output()
    assert body["transport"] == "invocation"
    assert_arrived_before(collector_state, "async-cf", 30, answered)

    status, _, answered = call(f"{server.url}/?tag=async-raise&n=2&raise=1")
    assert status == 500
    assert_arrived_before(collector_state, "async-raise", 2, answered)
