"""klime.senders.http over real sockets against the local collector: every status class,
the exact bytes on the wire, retries driven attempt by attempt within one deadline."""

from __future__ import annotations

import json
import logging
import re
import time

import pytest

from conftest import WRITE_KEY
from klime import ConfigurationError
from klime._batching import batch_body
from klime._deadline import Deadline
from klime._events import encode_group, encode_identify, encode_track
from klime._retry import RetryPolicy
from klime.devserver import Fault
from klime.senders.http import HttpSender, validate_endpoint


def make_sender(collector, **kw):
    kw.setdefault("retry_initial_delay", 10)
    kw.setdefault("read_timeout", 2.0)
    return HttpSender(WRITE_KEY, collector.url, **kw)


def events(n=3):
    return [encode_track("E", {"i": i}, f"u{i}", None) for i in range(n)]


def test_wire_request_exactly(collector):
    sender = make_sender(collector)
    batch = [
        encode_track("T", {"a": 1}, "u", None),
        encode_identify("u", {"e": "x"}),
        encode_group("g", None, "u"),
    ]
    result = sender.send(batch, Deadline())
    assert result.error is None and result.response.accepted == 3 and result.requests == 1
    (req,) = collector.requests()
    assert req.method == "POST" and req.path == "/v1/batch"
    assert req.body == b'{"batch":[' + b",".join(batch) + b"]}"
    headers = {k.lower(): v for k, v in req.headers.items()}
    assert headers["authorization"] == f"Bearer {WRITE_KEY}"
    assert headers["content-type"] == "application/json"
    assert re.fullmatch(r"klime-python/\d+\.\d+\.\d+.*", headers["user-agent"])
    assert [e["type"] for e in collector.events()] == ["track", "identify", "group"]


def test_keep_alive_reuses_one_connection(collector, caplog):
    caplog.set_level(logging.DEBUG, logger="urllib3.connectionpool")
    sender = make_sender(collector)
    for _ in range(5):
        assert sender.send(events(1), Deadline()).error is None
    opened = [r for r in caplog.records if "Starting new HTTP connection" in r.getMessage()]
    assert len(opened) == 1 and len(collector.requests()) == 5


def test_partial_failure_reports_only_the_failed(collector):
    collector.respond(Fault.partial(0, 2))
    result = make_sender(collector).send(events(3), Deadline())
    assert result.failed == (0, 2)
    assert result.response.accepted == 1 and result.response.failed == 2
    assert result.error.response is result.response
    assert result.requests == 1  # accepted ones are not resent


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_statuses_are_not_retried(collector, status):
    collector.respond(Fault.status_code(status))
    result = make_sender(collector).send(events(2), Deadline())
    assert result.error.status_code == status and not result.error.retryable
    assert result.failed == (0, 1) and result.requests == 1


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_transient_statuses_are_retried_with_the_same_bytes(collector, status):
    collector.respond(Fault.status_code(status), Fault.status_code(status))
    result = make_sender(collector).send(events(2), Deadline())
    assert result.error is None and result.requests == 3 and result.retries == 2
    bodies = [r.body for r in collector.requests()]
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert len(collector.events()) == 2


def test_retry_after_seconds_is_honoured(collector):
    collector.respond(Fault.retry(429, retry_after="1"))
    start = time.monotonic()
    result = make_sender(collector, retry_initial_delay=1).send(events(1), Deadline())
    elapsed = time.monotonic() - start
    assert result.error is None and result.requests == 2
    assert 0.9 <= elapsed < 5


def test_retry_after_http_date_is_honoured(collector):
    from email.utils import formatdate

    collector.respond(Fault.retry(503, retry_after=formatdate(time.time() + 2, usegmt=True)))
    start = time.monotonic()
    result = make_sender(collector, retry_initial_delay=1).send(events(1), Deadline())
    assert result.error is None
    assert 0.5 <= time.monotonic() - start < 5


def test_retry_after_never_past_the_deadline(collector):
    collector.respond(Fault.retry(429, retry_after="30"))
    start = time.monotonic()
    result = make_sender(collector).send(events(1), Deadline.after(0.5))
    assert result.error is not None and result.deadline_reached
    assert time.monotonic() - start < 0.5 + 0.2


def test_429_without_retry_after_uses_backoff(collector):
    collector.respond(Fault.status_code(429))
    result = make_sender(collector, retry_initial_delay=50).send(events(1), Deadline())
    assert result.error is None and result.retries == 1


def test_attempts_run_out_then_error(collector):
    collector.set_mode(Fault.status_code(500))
    result = make_sender(collector, retry_max_attempts=3).send(events(2), Deadline())
    assert result.error.retryable and result.error.status_code == 500
    assert result.requests == 3 and "3 attempts" in result.error.message
    assert len(collector.requests()) == 3


def test_connection_reset_is_retried(collector):
    collector.respond(Fault.reset_before_read())
    result = make_sender(collector).send(events(1), Deadline())
    assert result.error is None and result.requests == 2


def test_reset_after_read_is_retried_with_the_same_message_ids(collector):
    collector.respond(Fault.reset_after_read())
    batch = events(2)
    result = make_sender(collector).send(batch, Deadline())
    assert result.error is None
    first, second = collector.requests()
    assert first.body == second.body == batch_body(batch)


def test_read_timeout_is_retried_then_reported(collector):
    collector.set_mode(Fault.blackhole())
    sender = make_sender(collector, read_timeout=0.2, retry_max_attempts=2)
    start = time.monotonic()
    result = sender.send(events(1), Deadline())
    assert result.error is not None and result.requests == 2
    assert "timed out" in result.error.message
    assert time.monotonic() - start < 3


def test_deadline_cuts_a_black_hole_short(collector):
    collector.set_mode(Fault.blackhole())
    sender = make_sender(collector, read_timeout=30)
    start = time.monotonic()
    result = sender.send(events(1), Deadline.after(0.4))
    assert result.error is not None
    assert time.monotonic() - start < 0.4 + 0.3


def test_connection_refused_is_transient():
    sender = HttpSender(WRITE_KEY, "http://127.0.0.1:9", retry_max_attempts=2, retry_initial_delay=1)
    result = sender.send(events(1), Deadline.after(5))
    assert result.error.retryable and result.requests == 2
    assert "refused" in result.error.message


def test_non_json_and_unexpected_2xx_count_as_accepted(collector):
    collector.respond(Fault.non_json_200(), Fault.unexpected_200())
    sender = make_sender(collector)
    for _ in range(2):
        result = sender.send(events(2), Deadline())
        assert result.error is None and result.response.accepted == 2


def test_413_is_flagged_too_large(collector):
    collector.respond(Fault.status_code(413))
    result = make_sender(collector).send(events(4), Deadline())
    assert result.too_large and result.requests == 1


def test_error_bodies_are_truncated(collector):
    collector.respond(Fault(kind="status", status=400, body=json.dumps({"message": "x" * 5000}).encode()))
    result = make_sender(collector).send(events(1), Deadline())
    assert len(result.error.message) < 700


def test_after_fork_gives_a_fresh_connection_pool(collector):
    sender = make_sender(collector)
    sender.send(events(1), Deadline())
    old = sender._pool()
    sender.after_fork()
    assert sender._pool() is not old
    assert sender.send(events(1), Deadline.after(5)).error is None


def test_repr_hides_the_key(collector):
    assert WRITE_KEY not in repr(make_sender(collector))


@pytest.mark.parametrize(
    "endpoint, ok",
    [
        ("https://i.klime.com", True),
        ("https://i.klime.com/", True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost:1", True),
        ("http://[::1]:8080", True),
        ("http://i.klime.com", False),
        ("ftp://x", False),
        ("i.klime.com", False),
        ("https://user:pw@i.klime.com", False),
        ("https://i.klime.com:99999", False),
        ("", False),
    ],
)
def test_endpoint_validation(endpoint, ok):
    if ok:
        assert not validate_endpoint(endpoint).endswith("/")
    else:
        with pytest.raises(ConfigurationError):
            validate_endpoint(endpoint)


def test_plain_http_with_explicit_opt_in():
    assert validate_endpoint("http://collector.internal", allow_insecure=True) == "http://collector.internal"


def test_backoff_doubles_and_is_capped():
    policy = RetryPolicy(10, 1.0, jitter=0)
    assert [policy.backoff(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 16, 16]
    jittery = RetryPolicy(10, 1.0, jitter=0.2)
    assert all(0.8 <= jittery.backoff(1) <= 1.0 for _ in range(100))


def test_retry_after_parsing_is_capped():
    policy = RetryPolicy(5, 1.0)
    assert policy.retry_after("5") == 5
    assert policy.retry_after("100000") == 60
    assert policy.retry_after("garbage") is None
    assert policy.retry_after(None) is None


# ---------------------------------------------------------------------------------------
# the environment requests reads (proxies), read once per session


class _RecordingProxy:
    """A plain-HTTP forward proxy stand-in on 127.0.0.1: records each request line and
    answers as Klime would, without forwarding anything."""

    def __init__(self) -> None:
        import http.server
        import threading

        lines = self.lines = []

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                count = len(json.loads(self.rfile.read(length))["batch"])
                lines.append(self.requestline)
                body = json.dumps({"status": "ok", "accepted": count, "failed": 0, "errors": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    p = _RecordingProxy()
    yield p
    p.close()


def test_a_loopback_http_endpoint_ignores_the_proxy_variables(collector, proxy, monkeypatch):
    """The key would travel in clear to the proxy: a loopback http:// endpoint is reached
    directly (https endpoints honour the variables: see test_senders_http_hostile.py)."""
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    sender = make_sender(collector)
    for _ in range(3):
        assert sender.send(events(2), Deadline.after(5)).error is None
    assert proxy.lines == [] and len(collector.requests()) == 3


def test_no_proxy_is_honoured(collector, proxy, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("http_proxy", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    sender = make_sender(collector)
    assert sender.send(events(2), Deadline.after(5)).error is None
    assert proxy.lines == [] and len(collector.events()) == 2
