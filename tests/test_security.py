"""Secrets and transport security.

- The write key never appears in a log record (any logger, DEBUG, tracebacks included), on
  stdout/stderr, in a repr, an exception message, a ``SendError`` (pickled or not) or an
  ``on_error`` payload: every scenario below runs with everything captured, then the
  captured text is grepped for the key.
- TLS verification is always on and no option turns it off: a real HTTPS server on
  127.0.0.1 with a self-signed certificate is refused, and accepted once its certificate is
  trusted explicitly (proving it is the verification that refused it).
- ``http://`` is refused at construction unless the host is loopback or the user opts in.
- The endpoint is validated at construction; redirects are never followed.
- Response bodies quoted in errors and logs are truncated.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

import klime
from conftest import Recorder, wait_until
from klime import ConfigurationError, SendError
from klime.devserver import Fault
from klime.errors import MAX_QUOTED_BODY
from klime.senders.http import HttpSender
from support.tls_server import RecordingServer, self_signed

SECRET = "sk_live_9f8e7d6c5b4a3210ZYXWVUTS"
#: Pieces of the key that must not leak either (a key cut in half is still a leak).
SECRET_PARTS = (SECRET, SECRET[:16], SECRET[-16:])


def leaks(texts: List[str]) -> List[str]:
    return [t[:300] for t in texts if any(part in t for part in SECRET_PARTS)]


@pytest.fixture
def capture_everything(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG (klime, urllib3, requests, root), records kept with tracebacks."""
    caplog.set_level(logging.DEBUG)
    for name in ("klime", "urllib3", "urllib3.connectionpool", "requests"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield caplog


def formatted(records: List[logging.LogRecord]) -> List[str]:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    out = []
    for record in records:
        out.append(formatter.format(record))  # includes the traceback of exc_info
        out.append(repr(record.args))
    return out


def error_texts(error: BaseException) -> List[str]:
    texts = [str(error), repr(error), repr(vars(error)), repr(error.args)]
    if isinstance(error, SendError):
        texts += [json.dumps(error.events), repr(error.response), repr(pickle.dumps(error))]
        texts.append(repr(pickle.loads(pickle.dumps(error)).__dict__))
    cause = error.__cause__ or error.__context__
    if cause is not None:
        texts += error_texts(cause)
    return texts


# ---------------------------------------------------------------------------------------
# the write key never leaks


def test_write_key_is_in_no_captured_text_whatever_fails(collector, capture_everything, capfd):
    """Every failure path, everything captured, then grep for the key."""
    collector.write_key = SECRET
    texts: List[str] = []
    errors = Recorder()

    def on_error_that_raises(error: SendError, events: List[Dict[str, Any]]) -> None:
        errors(error, events)
        raise RuntimeError("a callback bug, with a traceback logged")

    def on_success_that_raises(response: Any) -> None:
        raise RuntimeError("on_success bug")

    def make(**kw: Any) -> klime.Client:
        kw.setdefault("endpoint", collector.url)
        kw.setdefault("retry_initial_delay", 1)
        kw.setdefault("retry_max_attempts", 2)
        kw.setdefault("on_error", on_error_that_raises)
        kw.setdefault("on_success", on_success_that_raises)
        return klime.Client(SECRET, **kw)

    client = make(transport="blocking")
    client.track("ok", user_id="u")  # success, on_success raises
    for fault in (
        Fault.status_code(401),
        Fault.status_code(400, body=b'{"message": "bad request"}'),
        Fault.status_code(413),
        Fault.partial(0),
    ):
        collector.respond(fault)
        client.track("E", {"p": 1}, user_id="u")
    collector.respond(Fault.status_code(500), Fault.status_code(500))
    client.track("E", user_id="u")  # retries exhausted
    collector.respond(Fault.reset_before_read(), Fault.reset_after_read())
    client.track("E", user_id="u")  # connection resets
    for fault in (Fault.status_code(401), Fault.status_code(503), Fault.partial(0)):
        collector.respond(fault, fault)
        with pytest.raises(SendError) as info:
            client.track_sync("S", user_id="u")
        texts += error_texts(info.value)
    texts += [repr(client), repr(client.sender), repr(client.transport), repr(client.stats())]
    client.shutdown()
    with pytest.raises(SendError) as info:
        client.track_sync("after", user_id="u")
    texts += error_texts(info.value)

    # read timeouts (a black hole), then queue overflow and shutdown leftovers
    slow = make(
        sender=HttpSender(
            SECRET, collector.url, read_timeout=0.2, retry_max_attempts=2, retry_initial_delay=1
        ),
        max_queue_size=5,
        flush_interval=20,
    )
    collector.set_mode(Fault.blackhole())
    for i in range(12):
        slow.track("E", {"i": i}, user_id="u")
    texts.append(repr(slow.flush(timeout=1.5)))
    texts.append(repr(slow.shutdown(timeout=0.3)))
    collector.set_mode(None)

    # nobody listening
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    refused = make(endpoint=f"http://127.0.0.1:{closed_port}", transport="blocking")
    refused.track("E", user_id="u")
    refused.shutdown()

    # the key from the environment, and configuration errors raised near it
    for kw in (
        {"endpoint": "http://example.com"},
        {"endpoint": f"https://user:{SECRET}@example.com"},
        {"max_queue_size": "big"},
        {"transport": "carrier-pigeon"},
    ):
        with pytest.raises(ConfigurationError) as cfg:
            klime.Client(SECRET, **kw)
        texts += error_texts(cfg.value)

    assert len(errors.calls) >= 8
    for error, events in errors.calls:
        texts += [*error_texts(error), json.dumps(events)]
    out, err = capfd.readouterr()
    texts += [out, err]
    texts += formatted(capture_everything.records)
    assert any("callback" in t for t in texts) and any("Traceback" in t for t in texts)  # captured
    assert leaks(texts) == []


def test_the_key_from_the_environment_does_not_leak(monkeypatch, collector, capture_everything):
    monkeypatch.setenv("KLIME_WRITE_KEY", SECRET)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    collector.respond(Fault.status_code(401))
    with pytest.raises(SendError) as info:
        klime.track_sync("E", user_id="u")
    texts = [*error_texts(info.value), repr(klime.client), repr(klime.get_client().sender)]
    texts += formatted(capture_everything.records)
    assert leaks(texts) == []


def test_the_key_is_sent_only_in_the_authorization_header(collector):
    collector.write_key = SECRET
    with klime.Client(SECRET, endpoint=collector.url) as client:
        client.track("E", {"k": "v"}, user_id="u")
        client.identify("u", {"t": 1})
    assert collector.wait_for_events(2, timeout=5)
    for request in collector.requests():
        assert request.header("Authorization") == f"Bearer {SECRET}"
        assert SECRET.encode() not in request.body
        others = {k: v for k, v in request.headers.items() if k.lower() != "authorization"}
        assert leaks([repr(others), request.path]) == []


@pytest.mark.parametrize("bad", [SECRET + "\n", SECRET + "\r\nX-Injected: 1", "sk_live_кл\u044e\u0447"])
def test_a_write_key_that_cannot_be_sent_is_refused_at_construction(bad, capture_everything):
    with pytest.raises(ConfigurationError) as info:
        klime.Client(bad, endpoint="http://127.0.0.1:9")
    assert leaks(error_texts(info.value)) == []


@pytest.mark.parametrize("bad", [SECRET + "\n", SECRET + "\r\nX-Injected: 1", "sk_live_кл\u044e\u0447"])
def test_a_write_key_that_cannot_be_sent_never_leaks_and_never_injects_a_header(
    bad, collector, capture_everything, capfd
):
    """Whatever the construction-time decision, such a key never reaches the wire (no header
    injection) and never appears in what is reported."""
    errors = Recorder()
    try:
        client = klime.Client(
            bad, endpoint=collector.url, transport="blocking", retry_max_attempts=2,
            retry_initial_delay=1, on_error=errors,
        )  # fmt: skip
    except ConfigurationError as exc:
        assert bad not in str(exc)
        return
    client.track("E", user_id="u")
    client.shutdown()
    assert collector.requests() == []  # nothing was sent with a broken header
    assert client.stats()["failed"] == 1 and len(errors.events) == 1
    texts = [t for error, _ in errors.calls for t in error_texts(error)]
    texts += formatted(capture_everything.records) + list(capfd.readouterr())
    bare = bad.strip().split("\r")[0]
    assert [t for t in texts if bare in t] == []


# ---------------------------------------------------------------------------------------
# TLS: always verified, nothing turns it off


OK_BODY = (200, {"Content-Type": "application/json"}, b'{"status":"ok","accepted":1,"failed":0,"errors":[]}')


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[Tuple[RecordingServer, Path]]:
    cert, key = self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    with RecordingServer(OK_BODY, tls=context) as server:
        yield server, cert


def test_tls_verification_is_on(collector):
    client = klime.Client(SECRET, endpoint="https://i.klime.com")
    pool = client.sender._pool().pool  # type: ignore[attr-defined]
    assert pool.cert_reqs == "CERT_REQUIRED" and pool.conn_kw["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    client.shutdown()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"CURL_CA_BUNDLE": ""},
        {"REQUESTS_CA_BUNDLE": ""},
        {"PYTHONHTTPSVERIFY": "0"},
    ],
    ids=["plain", "CURL_CA_BUNDLE-empty", "REQUESTS_CA_BUNDLE-empty", "PYTHONHTTPSVERIFY-0"],
)
def test_a_self_signed_certificate_is_refused(tls_server, monkeypatch, env, capture_everything):
    server, _ = tls_server
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    errors = Recorder()
    client = klime.Client(
        SECRET, endpoint=server.url("https"), transport="blocking", retry_max_attempts=1, on_error=errors
    )
    client.track("E", user_id="u")
    client.shutdown()
    assert server.hits == []  # no request got through the handshake
    (error,) = [e for e, _ in errors.calls]
    assert "TLS" in error.message and client.stats()["failed"] == 1
    assert leaks(error_texts(error) + formatted(capture_everything.records)) == []


def test_the_same_server_is_accepted_once_its_certificate_is_trusted(tls_server, monkeypatch):
    """Positive control: the refusal above is certificate verification, nothing else."""
    server, cert = tls_server
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))
    client = klime.Client(SECRET, endpoint=server.url("https"), transport="blocking", retry_max_attempts=1)
    assert client.track_sync("E", user_id="u").accepted == 1
    client.shutdown()
    assert server.hits == [f"Bearer {SECRET}"]


def test_no_option_turns_tls_verification_off():
    words = ("verify", "ssl", "tls", "cert", "insecure_tls", "check_hostname")
    for target in (klime.Client.__init__, HttpSender.__init__, klime.configure):
        params = inspect.signature(target).parameters
        assert not [p for p in params if any(w in p.lower() for w in words)], target


# ---------------------------------------------------------------------------------------
# plain http and endpoint validation, at construction


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://example.com",
        "http://i.klime.com/",
        "http://10.0.0.1:8080",
        "http://192.168.1.10",
        "http://localhost.example.com",
        "http://127.0.0.1.nip.io",
        "http://0x7f000001",
        "http://[::ffff:8.8.8.8]",
        "HTTP://EXAMPLE.COM",
    ],
)
def test_plain_http_to_a_remote_host_is_refused_at_construction(endpoint):
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(ConfigurationError, match="http://"):
        klime.Client(SECRET, endpoint=endpoint)
    assert {t.name for t in threading.enumerate()} - before == set()  # nothing was started


@pytest.mark.parametrize("endpoint", ["http://example.com", "http://10.1.2.3:8080/"])
def test_plain_http_needs_the_explicit_opt_in(endpoint):
    client = klime.Client(SECRET, endpoint=endpoint, allow_insecure_endpoint=True)
    assert client.sender.url.startswith("http://")  # type: ignore[attr-defined]
    client.shutdown()


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:1", "http://127.9.8.7", "http://localhost:8080", "http://[::1]:8080", "http://LOCALHOST"],
)
def test_plain_http_to_loopback_is_allowed(endpoint):
    klime.Client(SECRET, endpoint=endpoint).shutdown()


def test_plain_http_from_the_environment_is_refused_too(monkeypatch):
    monkeypatch.setenv("KLIME_WRITE_KEY", SECRET)
    monkeypatch.setenv("KLIME_ENDPOINT", "http://collector.example.com")
    with pytest.raises(ConfigurationError, match="http://"):
        klime.Client()
    with pytest.raises(ConfigurationError):
        klime.track("E", user_id="u")  # the default client fails at creation, not later


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://i.klime.com",
        "i.klime.com",
        "https://",
        "https://i.klime.com:99999",
        "https://i.klime.com:port",
        "https://i.klime.com/?key=x",
        "https://i.klime.com/#frag",
        "   ",
        123,
        ["https://i.klime.com"],
    ],
)
def test_a_bad_endpoint_is_refused_at_construction(endpoint):
    with pytest.raises(ConfigurationError) as info:
        klime.Client(SECRET, endpoint=endpoint)
    assert leaks(error_texts(info.value)) == []


def test_credentials_in_the_endpoint_are_refused_and_not_echoed():
    with pytest.raises(ConfigurationError) as info:
        klime.Client(SECRET, endpoint=f"https://me:{SECRET}@i.klime.com")
    assert leaks(error_texts(info.value)) == [] and "credentials" in str(info.value)


def test_redirects_are_never_followed():
    """A redirect could carry the request (and its Authorization header) elsewhere."""
    with RecordingServer(OK_BODY) as target:
        redirect = (307, {"Location": target.url() + "/v1/batch"}, b"")
        with RecordingServer(redirect) as origin:
            errors = Recorder()
            client = klime.Client(
                SECRET, endpoint=origin.url(), transport="blocking", retry_max_attempts=1, on_error=errors
            )
            client.track("E", user_id="u")
            client.shutdown()
            assert len(origin.hits) == 1 and target.hits == []
            assert errors.calls[0][0].status_code == 307 and client.stats()["failed"] == 1


# ---------------------------------------------------------------------------------------
# bodies quoted in errors are truncated

BIG = 1_000_000
LINE_LIMIT = MAX_QUOTED_BODY + 500  # a quoted body plus the sentence around it


@pytest.mark.parametrize(
    "fault",
    [
        Fault.status_code(400, body=b"<html>" + b"x" * BIG + b"</html>"),
        Fault.status_code(422, body=json.dumps({"message": "m" * BIG}).encode()),
        Fault.status_code(401, body=json.dumps({"message": {"nested": "n" * BIG}}).encode()),
        Fault.status_code(500, body=b"e" * BIG),
    ],
    ids=["html-400", "json-message-422", "json-object-401", "text-500"],
)
def test_error_bodies_are_truncated_in_errors_and_logs(make_client, collector, capture_everything, fault):
    errors = Recorder()
    client = make_client(transport="blocking", on_error=errors, retry_max_attempts=2)
    collector.set_mode(fault)
    client.track("E", user_id="u")
    with pytest.raises(SendError) as info:
        client.track_sync("E", user_id="u")
    reported = [errors.calls[0][0], info.value]
    for error in reported:
        assert len(str(error)) <= LINE_LIMIT and len(repr(error)) <= LINE_LIMIT + 100
        assert "more characters" in str(error)
    lines = [r.getMessage() for r in capture_everything.records if r.name.startswith("klime")]
    assert lines and max(map(len, lines)) <= LINE_LIMIT


def test_partial_failure_messages_are_truncated(make_client, collector, capture_everything):
    body = json.dumps(
        {
            "status": "ok",
            "accepted": 0,
            "failed": 2,
            # long, but within what klime reads of a 2xx answer (64 KiB + 2 KiB an event)
            "errors": [{"index": i, "message": "m" * 10_000, "code": "c" * 10_000} for i in range(2)],
        }
    ).encode()
    errors = Recorder()
    client = make_client(transport="blocking", on_error=errors)
    collector.respond(Fault.status_code(200, body=body))
    client.track("E", user_id="u")
    (error, events), = errors.calls  # fmt: skip
    assert len(events) == 1
    assert len(str(error)) <= LINE_LIMIT
    lines = [r.getMessage() for r in capture_everything.records if r.name.startswith("klime")]
    assert max(map(len, lines)) <= LINE_LIMIT


def test_the_collector_never_shows_the_key_in_its_summaries(collector):
    collector.write_key = SECRET
    with klime.Client(SECRET, endpoint=collector.url) as client:
        client.track("E", user_id="u")
    assert wait_until(lambda: len(collector.events()) == 1, timeout=5)
    import urllib.request

    request = urllib.request.Request(
        collector.url + "/_klime/requests", headers={"Authorization": f"Bearer {SECRET}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    assert leaks([text]) == [] and "Bearer ***" in text
