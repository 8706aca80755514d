"""klime.senders.http against servers that misbehave on purpose, all on 127.0.0.1.

- Every attempt is bounded in wall-clock time (headers and body included): a server that
  trickles its answer one byte at a time cannot stretch a deadline, nor hold a sender
  forever when there is no deadline (``*_sync``, ``shutdown`` and process exit included).
  A resolver that does not answer cannot stretch it either (``socket.getaddrinfo`` replaced
  by a held stand-in: see tests/support/fake_resolver.py); a resolved name keeps its
  ``Host`` header and its certificate check, and a kept-alive connection is not looked up
  again.
- Nothing a server sends can exhaust memory or break the books: a compressed answer is
  never inflated past a cap, an endless one is cut, one nested too deeply to parse is "no
  usable body" (the status decides).
- The write key goes to the endpoint only: a loopback ``http://`` endpoint never goes
  through a proxy; server text quoted back has the key masked.
- A control character in the endpoint is refused at construction.
- Importing klime and building a client imports no HTTP stack (``requests``/``urllib3``).
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import re
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Iterator, List

import pytest

import klime
from conftest import WRITE_KEY, Recorder, wait_until
from klime import ConfigurationError, SendError
from klime._deadline import Deadline
from klime._events import encode_track
from klime._retry import RetryPolicy, parse_retry_after
from klime.senders.http import LOOKUP_THREAD_NAME, HttpSender
from support.fake_resolver import HeldResolver
from support.hostile_server import HostileServer, answer, endless, response, send_and_tighten
from support.tls_server import RecordingServer, self_signed

#: Seconds between two bytes of a trickling server (each recv returns well within any
#: read timeout, which is why a per-recv timeout alone never ended such an attempt).
TRICKLE = 0.25
#: Scheduling slack allowed over a bound on a loaded 2-core machine.
SLACK = 0.6


def events(n: int = 2) -> List[bytes]:
    return [encode_track("E", {"i": i}, f"u{i}", None) for i in range(n)]


def accepted(n: int) -> bytes:
    return response(200, json.dumps({"status": "ok", "accepted": n, "failed": 0, "errors": []}).encode())


def sender_for(server: HostileServer, **options: object) -> HttpSender:
    options.setdefault("retry_initial_delay", 10)
    return HttpSender(WRITE_KEY, server.url, **options)  # type: ignore[arg-type]


def trickling(where: str) -> HostileServer:
    """A server whose 200 answer trickles from the status line, the headers or the body."""
    whole = accepted(2)
    starts = {"status line": 0, "headers": whole.index(b"\r\n") + 2, "body": whole.index(b"\r\n\r\n") + 4}
    split = starts[where]
    return HostileServer(answer(whole[split:], every=TRICKLE, head=whole[:split]))


# ---------------------------------------------------------------------------------------
# 1. wall-clock bounds


@pytest.mark.parametrize("where", ["status line", "headers", "body"])
def test_a_trickling_answer_cannot_stretch_the_deadline(where: str) -> None:
    with trickling(where) as server:
        sender = sender_for(server, read_timeout=10)
        started = time.monotonic()
        result = sender.send(events(2), Deadline.after(1.0))
        took = time.monotonic() - started
        assert took < 1.0 + SLACK, f"{took:.2f}s for a 1 s deadline"
        assert result.deadline_reached and result.error is not None and result.error.retryable
        assert result.failed == (0, 1) and result.response is None
        assert len(server.requests) == 1


def test_without_a_deadline_an_attempt_ends_within_connect_plus_read_time() -> None:
    with trickling("body") as server:
        sender = sender_for(server, connect_timeout=0.3, read_timeout=0.5, retry_max_attempts=2)
        started = time.monotonic()
        result = sender.send(events(2), Deadline())
        took = time.monotonic() - started
        assert took < 2 * (0.3 + 0.5) + SLACK, f"{took:.2f}s for two attempts of 0.8 s at most"
        assert result.requests == 2 and not result.deadline_reached
        assert result.error is not None and result.error.retryable and "timed out" in result.error.message


def test_a_deadline_tightened_meanwhile_ends_the_attempt_in_flight() -> None:
    with trickling("headers") as server:
        result, after = send_and_tighten(sender_for(server), server, events(1), by=0.3)
        assert after < 0.3 + TRICKLE + SLACK
        assert result.deadline_reached


def test_track_sync_is_bounded_by_its_timeout() -> None:
    with trickling("body") as server:
        client = klime.Client(WRITE_KEY, endpoint=server.url, retry_initial_delay=10)
        try:
            started = time.monotonic()
            with pytest.raises(SendError) as caught:
                client.track_sync("E", user_id="u", timeout=1)
            assert time.monotonic() - started < 1 + SLACK
            assert caught.value.retryable
        finally:
            client.shutdown(0)


def test_shutdown_is_bounded_and_says_it_timed_out() -> None:
    with trickling("status line") as server:
        client = klime.Client(WRITE_KEY, endpoint=server.url, retry_initial_delay=10, on_error=Recorder())
        client.track("E", user_id="u")
        started = time.monotonic()
        result = client.shutdown(1)
        assert time.monotonic() - started < 1 + SLACK
        assert result.timed_out and not result.sent
        stats = client.stats()
        assert stats["tracked"] == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]


def test_process_exit_is_bounded_by_exit_timeout(src_env: dict) -> None:
    with trickling("body") as server:
        code = textwrap.dedent(
            f"""
            import klime
            client = klime.Client({WRITE_KEY!r}, endpoint={server.url!r}, exit_timeout=1)
            client.track("E", user_id="u")
            """
        )
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", code], env=src_env, capture_output=True, timeout=30)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert server.requests, "the event was never sent"
        assert took < 1 + 2.5, f"exit took {took:.2f}s with exit_timeout=1"  # + interpreter start-up


# ---------------------------------------------------------------------------------------
# 2. memory and the books


def gzip_bomb(inflated: int) -> bytes:
    """A gzip stream of ``inflated`` zero bytes, built without holding them in memory."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    out = [packer.compress(zeros) for _ in range(inflated >> 20)]
    out.append(packer.flush())
    return b"".join(out)


def test_a_compressed_answer_is_never_inflated_past_a_cap() -> None:
    bomb = gzip_bomb(128 << 20)  # ~128 KiB on the wire, 128 MiB inflated
    with HostileServer(answer(response(200, bomb, {"Content-Encoding": "gzip"}))) as server:
        sender = sender_for(server)
        tracemalloc.start()
        try:
            result = sender.send(events(2), Deadline.after(10))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.error is None and result.response.accepted == 2  # no usable body: all accepted
        assert peak < 8 << 20, f"peak {peak >> 20} MiB while reading a 128 MiB gzip answer"
        assert server.requests[0].headers["accept-encoding"] == "identity"


def test_a_small_compressed_answer_is_still_read() -> None:
    body = gzip.compress(json.dumps({"status": "ok", "errors": [{"index": 1, "message": "bad"}]}).encode())
    with HostileServer(answer(response(200, body, {"Content-Encoding": "gzip"}))) as server:
        result = sender_for(server).send(events(2), Deadline.after(10))
        assert result.failed == (1,) and result.response.accepted == 1


@pytest.mark.parametrize("status", [200, 500])
def test_an_endless_answer_is_cut_and_its_connection_dropped(status: int) -> None:
    head = f"HTTP/1.1 {status} X\r\nContent-Length: {1 << 40}\r\n\r\n".encode()
    with HostileServer(endless(head), answer(accepted(1))) as server:
        sender = sender_for(server)
        tracemalloc.start()
        try:
            result = sender.send(events(1), Deadline.after(10))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result.error is None and result.requests == (1 if status == 200 else 2)
        assert peak < 8 << 20, f"peak {peak >> 20} MiB while reading an endless answer"
        if status == 200:
            assert sender.send(events(1), Deadline.after(10)).error is None
        assert server.connections == 2  # the cut connection was not reused


NESTED = b"[" * 30_000 + b"]" * 30_000  # within the bytes read, far past the parser's depth


def test_a_2xx_nested_too_deeply_to_parse_is_all_accepted() -> None:
    with HostileServer(answer(response(200, NESTED))) as server:
        result = sender_for(server).send(events(3), Deadline.after(10))
        assert result.error is None and result.failed == () and result.response.accepted == 3


def test_a_503_nested_too_deeply_to_parse_is_retried() -> None:
    with HostileServer(answer(response(503, NESTED)), answer(accepted(2))) as server:
        result = sender_for(server).send(events(2), Deadline.after(10))
        assert result.error is None and result.requests == 2


def test_a_deeply_nested_answer_reaches_no_on_error_through_a_client() -> None:
    on_error = Recorder()
    with HostileServer(answer(response(200, NESTED))) as server:
        client = klime.Client(WRITE_KEY, endpoint=server.url, transport="blocking", on_error=on_error)
        try:
            client.track("E", user_id="u")
            assert client.stats()["sent"] == 1 and on_error.calls == []
        finally:
            client.shutdown(1)


# ---------------------------------------------------------------------------------------
# 3. the key goes to the endpoint only


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileServer]:
    """A proxy stand-in that records whether it was contacted (and refuses to tunnel)."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with HostileServer(answer(response(502, b"no tunnel"))) as server:
        for name in PROXY_VARIABLES:
            monkeypatch.setenv(name, server.url)
        yield server


def test_a_loopback_http_endpoint_never_goes_through_a_proxy(proxy: HostileServer) -> None:
    with HostileServer(answer(accepted(2))) as endpoint:
        result = sender_for(endpoint).send(events(2), Deadline.after(5))
        assert result.error is None
        assert endpoint.requests[0].headers["authorization"] == f"Bearer {WRITE_KEY}"
    assert proxy.connections == 0 and proxy.requests == []


def test_an_https_endpoint_honours_the_proxy_variables(proxy: HostileServer) -> None:
    with HostileServer(answer(accepted(1))) as target:
        sender = HttpSender(WRITE_KEY, f"https://127.0.0.1:{target.port}", retry_max_attempts=1)
        result = sender.send(events(1), Deadline.after(5))
        assert result.error is not None and result.error.retryable
        assert proxy.wait_for_requests(1)
        assert proxy.requests[0].line.startswith(f"CONNECT 127.0.0.1:{target.port} ")
        assert "authorization" not in proxy.requests[0].headers  # only a tunnel was asked for
        assert target.connections == 0


def test_an_https_endpoint_honours_no_proxy(proxy: HostileServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with HostileServer(answer(accepted(1))) as target:  # speaks no TLS: the handshake fails
        sender = HttpSender(
            WRITE_KEY, f"https://127.0.0.1:{target.port}", retry_max_attempts=1, connect_timeout=0.5
        )
        result = sender.send(events(1), Deadline.after(3))
        assert result.error is not None
        assert wait_until(lambda: target.connections >= 1, 5)
    assert proxy.connections == 0


def test_a_proxys_credentials_go_to_the_proxy_only(
    proxy: HostileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user and password in the proxy's URL are sent to the proxy (``Proxy-Authorization``,
    as ``requests`` sends them), percent-decoded; the tunnel request carries no write key."""
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, f"http://proxy%20user:p%40ss@127.0.0.1:{proxy.port}")
    sender = HttpSender(WRITE_KEY, "https://i.klime.invalid", retry_max_attempts=1)
    result = sender.send(events(1), Deadline.after(5))
    assert result.error is not None and result.error.retryable and "proxy" in result.error.message
    assert proxy.wait_for_requests(1)
    (request,) = proxy.requests
    assert request.line.startswith("CONNECT i.klime.invalid:443 ")
    assert request.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"proxy user:p@ss").decode()
    assert WRITE_KEY not in request.line + repr(request.headers) + request.body.decode("latin-1")


def test_a_plain_http_endpoint_through_a_forward_proxy_names_the_whole_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``allow_insecure_endpoint`` to a host that is not loopback, with ``HTTP_PROXY`` set: the
    proxy gets the whole URL in the request line (the endpoint's name is never looked up
    here), and the batch is accepted through it."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with HostileServer(answer(accepted(2))) as forward:
        for name in ("HTTP_PROXY", "http_proxy"):
            monkeypatch.setenv(name, f"http://u:pw@127.0.0.1:{forward.port}")
        sender = HttpSender(WRITE_KEY, "http://collector.invalid:8080", allow_insecure_endpoint=True)
        assert sender.send(events(2), Deadline.after(5)).error is None
        (request,) = forward.requests
        assert request.line == "POST http://collector.invalid:8080/v1/batch HTTP/1.1"
        assert request.headers["host"] == "collector.invalid:8080"
        assert request.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"u:pw").decode()
        assert request.headers["authorization"] == f"Bearer {WRITE_KEY}"


def test_a_netrc_entry_never_replaces_the_write_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``~/.netrc`` (or ``$NETRC``) naming the endpoint's host: the request still carries the
    write key, and nothing from the file."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password elsewhere\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text(netrc.read_text())
    (tmp_path / ".netrc").chmod(0o600)
    with HostileServer(answer(accepted(1))) as endpoint:
        assert sender_for(endpoint).send(events(1), Deadline.after(5)).error is None
        assert endpoint.requests[0].headers["authorization"] == f"Bearer {WRITE_KEY}"


@pytest.mark.parametrize(
    "proxy_url, reason",
    [
        ("socks5://127.0.0.1:9", "SOCKS proxy needs PySocks"),
        ("ftp://127.0.0.1:9", "the proxy cannot be used"),
    ],
)
def test_a_proxy_that_cannot_be_used_refuses_the_batch_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, proxy_url: str, reason: str
) -> None:
    if proxy_url.startswith("socks"):
        try:
            import socks  # noqa: F401
        except ImportError:
            pass
        else:
            pytest.skip("PySocks is installed here")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy_url)
    result = HttpSender(WRITE_KEY, "https://i.klime.invalid").send(events(1), Deadline.after(5))
    assert result.error is not None and not result.error.retryable and result.requests == 0
    assert reason in result.error.message and WRITE_KEY not in result.error.message


def test_a_ca_bundle_that_cannot_be_loaded_refuses_the_batch_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``REQUESTS_CA_BUNDLE`` naming a file that is missing or holds no certificate: no
    request goes (TLS could not be verified), and the reason names the bundle."""
    for content in (None, "not a certificate"):
        bundle = tmp_path / "bundle.pem"
        if content is not None:
            bundle.write_text(content)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))
        result = HttpSender(WRITE_KEY, "https://127.0.0.1:9").send(events(1), Deadline.after(5))
        assert result.error is not None and not result.error.retryable and result.requests == 0
        assert "CA certificates" in result.error.message and str(bundle) in result.error.message


ECHO = f"Forbidden. You sent: Authorization: Bearer {WRITE_KEY}\r\nX-Key: {WRITE_KEY}".encode()


@pytest.mark.parametrize(
    "body",
    [ECHO, json.dumps({"message": ECHO.decode()}).encode(), gzip.compress(ECHO)],
    ids=["text", "json-message", "gzip"],
)
def test_server_text_quoted_back_has_the_key_masked(body: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    encoding = {"Content-Encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
    on_error = Recorder()
    with HostileServer(answer(response(403, body, encoding))) as server:
        client = klime.Client(WRITE_KEY, endpoint=server.url, transport="blocking", on_error=on_error)
        try:
            client.track("E", user_id="u")
        finally:
            client.shutdown(1)
    ((error, _),) = on_error.calls
    assert "Authorization: ***" in error.message and "X-Key: ***" in error.message
    texts = [error.message, str(error), repr(error)] + [r.getMessage() for r in caplog.records]
    assert not [t for t in texts if WRITE_KEY in t]


def test_a_partial_answer_quoting_the_key_has_it_masked() -> None:
    body = json.dumps(
        {"errors": [{"index": 0, "message": f"key {WRITE_KEY} is not allowed", "code": WRITE_KEY}]}
    )
    with HostileServer(answer(response(200, body.encode()))) as server:
        result = sender_for(server).send(events(2), Deadline.after(5))
    assert result.failed == (0,) and result.error is not None
    assert WRITE_KEY not in result.error.message and "key *** is not allowed (***)" in result.error.message


# ---------------------------------------------------------------------------------------
# 4. the endpoint


@pytest.mark.parametrize("bad", ["\t", "\n", "\r", "\x00", "\x1b", "\x7f", " ", "\x85"])
def test_a_control_character_in_the_endpoint_is_refused_at_construction(bad: str) -> None:
    endpoint = f"http://127.0.0.1{bad}:8080"
    with pytest.raises(ConfigurationError, match="control character"):
        HttpSender(WRITE_KEY, endpoint)
    with pytest.raises(ConfigurationError):
        klime.Client(WRITE_KEY, endpoint=endpoint)


# ---------------------------------------------------------------------------------------
# 5 and 6. any urllib3; no HTTP stack until the first send


def test_retry_after_is_parsed_without_urllib3() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(" 7 ", 60, now=now) == 7
    assert parse_retry_after("100000", 60, now=now) == 60
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:30 GMT", 60, now=now) == pytest.approx(10)
    assert parse_retry_after("Tue, 14 Nov 2023 22:00:00 GMT", 60, now=now) == 0  # in the past
    for bad in ("", None, "-1", "1.5", "soon", "Mon, 99 Foo 2023"):
        assert parse_retry_after(bad, 60, now=now) is None
    policy = RetryPolicy(3, 0.01, retry_after_max=5)
    assert policy.retry_after("30") == 5
    transient = [s for s in (200, 400, 408, 413, 429, 500, 503, 599) if policy.is_transient_status(s)]
    assert transient == [408, 429, 500, 503, 599]


def test_a_serverless_client_imports_no_http_stack_before_its_first_send(src_env: dict) -> None:
    """On serverless the HTTP library is loaded at the first send (start-up time is the
    caller's latency); a long-running process's client loads it when made, on its own
    thread (see the next test)."""
    code = textwrap.dedent(
        """
        import sys
        import klime
        from klime.senders.http import HttpSender
        client = klime.Client("k", endpoint="http://127.0.0.1:9", transport="invocation")
        HttpSender("k", "http://127.0.0.1:9")
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("requests", "urllib3"))
        client.shutdown(0)
        print(heavy)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=src_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_long_running_client_initialises_openssl_when_made_and_requests_later(src_env: dict) -> None:
    """OpenSSL on the thread that makes the client (first initialised from a sender thread
    it crashed uWSGI workers: tests/test_uwsgi.py, ``--lazy-apps --shared-import klime``);
    ``requests`` at the first send, off the caller's path."""
    code = textwrap.dedent(
        """
        import sys
        import klime
        client = klime.Client("k", endpoint="http://127.0.0.1:9", transport="background")
        print("_ssl" in sys.modules, "_hashlib" in sys.modules, "requests" in sys.modules)
        client.shutdown(0)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=src_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True True False"


# ---------------------------------------------------------------------------------------
# a TLS handshake that trickles


class _TlsTrickle:
    """A TCP server on 127.0.0.1 that reads a ClientHello, then answers with the header of
    a 16 KiB TLS handshake record and one byte of it every ``every`` seconds: a handshake
    that never ends while each byte comes well within any per-read timeout."""

    def __init__(self, every: float = 0.1) -> None:
        import socket

        self._every = every
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.url = f"https://127.0.0.1:{self._listener.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn) -> None:
        with conn:
            try:
                conn.recv(65536)  # the ClientHello
                conn.sendall(b"\x16\x03\x03\x40\x00")  # a handshake record of 16 KiB follows...
                for _ in range(600):  # ...one byte at a time (bounded: 60 s at most)
                    if self._stop.wait(self._every):
                        return
                    conn.sendall(b"\x02")
            except OSError:
                return  # the client hung up

    def __enter__(self) -> _TlsTrickle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


def test_a_trickling_tls_handshake_ends_within_the_connect_timeout() -> None:
    with _TlsTrickle() as server:
        sender = HttpSender(WRITE_KEY, server.url, connect_timeout=1.0, read_timeout=10, retry_max_attempts=1)
        started = time.monotonic()
        result = sender.send(events(2), Deadline())
        took = time.monotonic() - started
    assert took < 1.0 + SLACK, f"{took:.2f}s for a 1 s connect timeout"
    assert result.error is not None and result.error.retryable and server.connections == 1


def test_a_trickling_tls_handshake_ends_at_the_deadline() -> None:
    with _TlsTrickle() as server:
        sender = HttpSender(WRITE_KEY, server.url, connect_timeout=10, read_timeout=10)
        started = time.monotonic()
        result = sender.send(events(2), Deadline.after(0.8))
        took = time.monotonic() - started
    assert took < 0.8 + SLACK, f"{took:.2f}s for a 0.8 s deadline"
    assert result.deadline_reached and result.error is not None


# ---------------------------------------------------------------------------------------
# a resolver that does not answer

#: Names the held resolver stands in for: each resolves to 127.0.0.1 once released.
HELD_NAME = "klime-test.invalid"
HELD_PROXY_NAME = "klime-proxy.invalid"
#: A name the stand-in resolver says does not exist.
UNKNOWN_NAME = "klime-missing.invalid"


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[HeldResolver]:
    """``socket.getaddrinfo`` replaced for the test by a resolver that holds the look-ups of
    :data:`HELD_NAME` and :data:`HELD_PROXY_NAME` until released (a real DNS server that
    does not answer cannot be pointed at without changing /etc/resolv.conf). No proxy from
    the environment. At teardown every held look-up is released and must end."""
    for name in (*PROXY_VARIABLES, "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    names = {HELD_NAME: "127.0.0.1", HELD_PROXY_NAME: "127.0.0.1"}
    held = HeldResolver(names, unknown=[UNKNOWN_NAME]).install(monkeypatch)
    yield held
    assert held.finish(), "a name look-up thread was still running 5 s after its release"


def held_sender(port: int, scheme: str = "http", **options: object) -> HttpSender:
    """A sender for ``scheme://klime-test.invalid:port`` (plain http allowed)."""
    options.setdefault("retry_initial_delay", 10)
    url = f"{scheme}://{HELD_NAME}:{port}"
    return HttpSender(WRITE_KEY, url, allow_insecure_endpoint=True, **options)  # type: ignore[arg-type]


def test_a_name_look_up_that_does_not_answer_ends_within_the_connect_timeout(resolver: HeldResolver) -> None:
    with HostileServer(answer(accepted(2))) as server:
        sender = held_sender(server.port, connect_timeout=0.5, read_timeout=10, retry_max_attempts=1)
        started = time.monotonic()
        outcome = sender.attempt(events(2), Deadline())
        took = time.monotonic() - started
        assert took < 0.5 + 1, f"{took:.2f}s for a 0.5 s connect timeout"
        assert outcome.kind == "retry" and not outcome.cut_short
        pattern = rf"the name look-up of {re.escape(HELD_NAME)} did not answer within (\d+\.\d) s"
        said = re.fullmatch(pattern, outcome.reason)
        assert said is not None and 0.5 <= float(said.group(1)) < 0.5 + 1, outcome.reason
        result = sender.send(events(2), Deadline())
        assert result.error is not None and result.error.retryable
        assert "name look-up" in result.error.message and WRITE_KEY not in result.error.message
        assert server.connections == 0
    assert resolver.look_ups_of(HELD_NAME) == [LOOKUP_THREAD_NAME] * 2


def test_a_name_look_up_that_does_not_answer_ends_at_the_deadline(resolver: HeldResolver) -> None:
    with HostileServer(answer(accepted(2))) as server:
        sender = held_sender(server.port, connect_timeout=10, read_timeout=10)
        started = time.monotonic()
        result = sender.send(events(2), Deadline.after(0.5))
        took = time.monotonic() - started
    assert took < 0.5 + 1, f"{took:.2f}s for a 0.5 s deadline"
    assert result.deadline_reached and result.error is not None and result.error.retryable
    assert f"the name look-up of {HELD_NAME} did not answer" in result.error.message


def test_a_deadline_tightened_during_a_name_look_up_ends_it(resolver: HeldResolver) -> None:
    with HostileServer(answer(accepted(1))) as server:
        sender = held_sender(server.port, connect_timeout=10, read_timeout=10)
        deadline = Deadline()
        results = []
        worker = threading.Thread(target=lambda: results.append(sender.send(events(1), deadline)))
        worker.start()
        assert wait_until(lambda: bool(resolver.look_ups_of(HELD_NAME)), 5)
        tightened = time.monotonic()
        deadline.tighten(tightened + 0.3)
        worker.join(5)
        assert not worker.is_alive()
        assert time.monotonic() - tightened < 0.3 + 1
        assert results[0].deadline_reached and "name look-up" in results[0].error.message


def test_track_sync_is_bounded_by_its_timeout_when_the_resolver_does_not_answer(
    resolver: HeldResolver,
) -> None:
    with HostileServer(answer(accepted(1))) as server:
        client = klime.Client(
            WRITE_KEY, endpoint=f"http://{HELD_NAME}:{server.port}", allow_insecure_endpoint=True,
            retry_initial_delay=10,
        )
        try:
            started = time.monotonic()
            with pytest.raises(SendError) as caught:
                client.track_sync("E", user_id="u", timeout=1)
            assert time.monotonic() - started < 1 + 1
            assert caught.value.retryable and "name look-up" in caught.value.message
        finally:
            client.shutdown(0)


def test_a_flush_is_bounded_by_its_timeout_when_the_resolver_does_not_answer(resolver: HeldResolver) -> None:
    """The Lambda case: the invocation transport's flush sends on the handler's thread."""
    with HostileServer(answer(accepted(1))) as server:
        client = klime.Client(
            WRITE_KEY, endpoint=f"http://{HELD_NAME}:{server.port}", allow_insecure_endpoint=True,
            transport="invocation", retry_initial_delay=10, on_error=Recorder(),
        )
        try:
            client.track("E", user_id="u")
            started = time.monotonic()
            result = client.flush(timeout=1)
            assert time.monotonic() - started < 1 + 1
            assert result.sent == 0 and not result.ok
            assert server.connections == 0
        finally:
            client.shutdown(0)


def test_a_resolved_name_reaches_the_server_with_its_host_header_and_is_looked_up_once(
    resolver: HeldResolver,
) -> None:
    """The address the resolver gave is the one connected to; the Host header keeps the
    name; a kept-alive connection makes no second look-up."""
    resolver.release()
    with HostileServer(answer(accepted(1))) as server:
        sender = held_sender(server.port, connect_timeout=2)
        for _ in range(2):
            result = sender.send(events(1), Deadline.after(5))
            assert result.error is None and result.response is not None and result.response.accepted == 1
        assert [r.headers["host"] for r in server.requests] == [f"{HELD_NAME}:{server.port}"] * 2
        assert server.connections == 1
    assert resolver.look_ups_of(HELD_NAME) == [LOOKUP_THREAD_NAME]


def test_a_name_that_does_not_exist_is_a_connection_error_at_once(resolver: HeldResolver) -> None:
    sender = HttpSender(WRITE_KEY, f"http://{UNKNOWN_NAME}:9", allow_insecure_endpoint=True)
    started = time.monotonic()
    outcome = sender.attempt(events(1), Deadline.after(5))
    assert time.monotonic() - started < 1
    assert outcome.kind == "retry" and outcome.reason == "connection error"
    assert resolver.look_ups_of(UNKNOWN_NAME) == [LOOKUP_THREAD_NAME]


def test_an_ip_literal_host_needs_no_look_up_thread(resolver: HeldResolver) -> None:
    with HostileServer(answer(accepted(1))) as server:
        assert sender_for(server).send(events(1), Deadline.after(5)).error is None
    assert resolver.look_ups_of("127.0.0.1") == [threading.current_thread().name]
    assert not [thread for _, thread in resolver.calls if thread == LOOKUP_THREAD_NAME]


def test_a_proxys_name_look_up_is_the_one_bounded(
    resolver: HeldResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https endpoint through a proxy named in the environment: the proxy's name is
    looked up (bounded), never the endpoint's; once it answers, the proxy is asked for a
    tunnel to the endpoint's name."""
    with HostileServer(answer(response(502, b"no tunnel"))) as proxy:
        for name in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(name, f"http://{HELD_PROXY_NAME}:{proxy.port}")
        sender = HttpSender(
            WRITE_KEY, "https://klime-endpoint.invalid", connect_timeout=0.5, retry_max_attempts=1
        )
        started = time.monotonic()
        result = sender.send(events(1), Deadline())
        assert time.monotonic() - started < 0.5 + 1
        assert result.error is not None and result.error.retryable
        assert f"the name look-up of {HELD_PROXY_NAME} did not answer" in result.error.message
        assert proxy.connections == 0
        resolver.release()
        result = sender.send(events(1), Deadline.after(5))
        assert result.error is not None and result.error.retryable  # the stand-in never tunnels
        assert proxy.wait_for_requests(1)
        assert proxy.requests[0].line.startswith("CONNECT klime-endpoint.invalid:443 ")
    assert resolver.look_ups_of("klime-endpoint.invalid") == []
    assert resolver.look_ups_of(HELD_PROXY_NAME) == [LOOKUP_THREAD_NAME] * 2


@pytest.mark.parametrize("certified", [HELD_NAME, "someone-else.invalid"])
def test_tls_checks_the_certificate_against_the_looked_up_name(
    resolver: HeldResolver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, certified: str
) -> None:
    """Connected to 127.0.0.1, the certificate is still checked against the endpoint's name
    (SNI and host name check): one for that name alone is accepted, one for another name
    refused."""
    cert, key = self_signed(tmp_path, dns_names=(certified,), ip_addresses=())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    resolver.release()
    body = (200, {"Content-Type": "application/json"}, json.dumps({"status": "ok", "accepted": 1}).encode())
    with RecordingServer(body, tls=context) as server:
        sender = held_sender(server.httpd.server_address[1], scheme="https", retry_max_attempts=1)
        result = sender.send(events(1), Deadline.after(5))
        if certified == HELD_NAME:
            assert result.error is None and server.hits == [f"Bearer {WRITE_KEY}"]
        else:
            assert result.error is not None and "TLS error" in result.error.message and server.hits == []
