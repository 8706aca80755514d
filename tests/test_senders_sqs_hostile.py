"""klime.senders.sqs against SQS endpoints that misbehave on purpose, all on 127.0.0.1.

A ``SendMessageBatch`` call on the client klime builds is bounded in wall-clock time, as an
HTTP attempt is: it ends by the least of ``connect_timeout + read_timeout`` and the caller's
deadline (a deadline tightened meanwhile included) whatever the server does, an answer
dripped one byte every 0.1 s included (each byte well within any read timeout, which is why
botocore's per-read timeout alone never ended such a call). Then it is a transient failure,
"the answer did not complete within N s", with no credential in it, and a flush or shutdown
returns within its timeout with every event counted. A normal answer (a raw server and
moto's server, over real sockets) still goes through, with no thread per call on a
kept-alive connection; a client of the user's is used as it is.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from types import SimpleNamespace
from typing import Any, Iterator, List
from urllib.parse import parse_qs

import pytest

import klime
from conftest import Recorder, conserved
from klime._deadline import Deadline
from klime._events import encode_track
from support.hostile_server import HostileServer, Received, Script, answer, response, send_and_tighten

boto3 = pytest.importorskip("boto3")
from klime.senders.sqs import SqsSender, _bound_connections  # noqa: E402

#: Seconds between two bytes of a dripping answer: far below any read timeout here.
DRIP = 0.1
#: Scheduling slack allowed over a bound on a loaded 2-core machine.
SLACK = 0.6
#: Credentials the tests' boto3 signs with: they must never show in an outcome.
ACCESS_KEY = "AKIAKLIMEHOSTILE0001"
SECRET_KEY = "klime-hostile-secret-never-shown"
QUEUE_PATH = "/123456789012/klime-events"


@pytest.fixture
def aws_keys(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def events(n: int = 2) -> List[bytes]:
    return [encode_track("E", {"i": i}, f"u{i}", None) for i in range(n)]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode("utf-8")).hexdigest()


def sqs_answer(request: Received) -> bytes:
    """A whole SendMessageBatch answer that accepts every entry of ``request``, in the
    protocol it came in: JSON (recent botocore) or the query protocol (botocore 1.29)."""
    if "json" in request.headers.get("content-type", ""):
        entries = json.loads(request.body)["Entries"]
        accepted = [
            {"Id": e["Id"], "MessageId": f"m-{e['Id']}", "MD5OfMessageBody": _md5(e["MessageBody"])}
            for e in entries
        ]
        body = json.dumps({"Successful": accepted, "Failed": []}).encode()
        return response(200, body, {"Content-Type": "application/x-amz-json-1.0"})
    form = parse_qs(request.body.decode("utf-8"))
    items = []
    for n in range(1, 11):
        ids = form.get(f"SendMessageBatchRequestEntry.{n}.Id")
        if not ids:
            break
        text = form[f"SendMessageBatchRequestEntry.{n}.MessageBody"][0]
        items.append(
            f"<SendMessageBatchResultEntry><Id>{ids[0]}</Id><MessageId>m-{ids[0]}</MessageId>"
            f"<MD5OfMessageBody>{_md5(text)}</MD5OfMessageBody></SendMessageBatchResultEntry>"
        )
    xml = (
        "<SendMessageBatchResponse><SendMessageBatchResult>" + "".join(items) + "</SendMessageBatchResult>"
        "<ResponseMetadata><RequestId>r-1</RequestId></ResponseMetadata></SendMessageBatchResponse>"
    )
    return response(200, xml.encode(), {"Content-Type": "text/xml"})


def accepting(drip_from: str = "", every: float = DRIP) -> Script:
    """Answers every request with :func:`sqs_answer`: whole at once, or dripped one byte
    every ``every`` seconds from its ``"status line"`` or its ``"body"``."""

    def script(conn: Any, request: Received, stop: threading.Event) -> None:
        whole = sqs_answer(request)
        if not drip_from:
            answer(whole)(conn, request, stop)
            return
        split = 0 if drip_from == "status line" else whole.index(b"\r\n\r\n") + 4
        answer(whole[split:], every=every, head=whole[:split])(conn, request, stop)

    return script


@pytest.fixture
def dripping(aws_keys: None) -> Iterator[HostileServer]:
    with HostileServer(accepting("status line")) as server:
        yield server


def sender_for(server: HostileServer, host: str = "127.0.0.1", **options: Any) -> SqsSender:
    options.setdefault("retry_initial_delay", 10)
    sender = SqsSender(f"http://{host}:{server.port}{QUEUE_PATH}", **options)
    assert sender.client is not None  # built outside the timed part
    return sender


def assert_no_secret(text: str) -> None:
    assert ACCESS_KEY not in text and SECRET_KEY not in text


# ---------------------------------------------------------------------------------------
# the wall-clock bound of one call


def test_a_dripping_answer_ends_within_connect_plus_read_time(dripping: HostileServer) -> None:
    """No deadline: the call ends by connect + read timeout (1.5 s), transient, with the reason."""
    sender = sender_for(dripping, connect_timeout=0.5, read_timeout=1, retry_max_attempts=1)
    started = time.monotonic()
    result = sender.send(events(2), Deadline())
    took = time.monotonic() - started
    assert took < 1.5 + SLACK, f"{took:.2f}s for a call of 1.5 s at most"
    assert result.failed == (0, 1) and result.requests == 1 and not result.deadline_reached
    assert result.error is not None and result.error.retryable
    assert "the answer did not complete within 1.5 s" in result.error.message
    assert_no_secret(result.error.message + repr(result))
    assert len(dripping.requests) == 1


@pytest.mark.parametrize("drip_from", ["status line", "body"])
def test_a_dripping_answer_ends_at_the_deadline(aws_keys: None, drip_from: str) -> None:
    with HostileServer(accepting(drip_from)) as server:
        sender = sender_for(server, read_timeout=5)
        started = time.monotonic()
        result = sender.send(events(2), Deadline.after(0.8))
        took = time.monotonic() - started
        assert took < 0.8 + SLACK, f"{took:.2f}s for a 0.8 s deadline"
        assert result.deadline_reached and result.failed == (0, 1)
        assert result.error is not None and result.error.retryable
        assert "the answer did not complete within 0.8 s" in result.error.message
        assert_no_secret(result.error.message)
        assert len(server.requests) == 1


def test_a_deadline_tightened_meanwhile_ends_the_call_in_flight(dripping: HostileServer) -> None:
    result, after = send_and_tighten(sender_for(dripping), dripping, events(1), by=0.3)
    assert after < 0.3 + DRIP + SLACK
    assert result.deadline_reached and result.failed == (0,)


# ---------------------------------------------------------------------------------------
# through a client: flush and shutdown keep their timeouts, every event counted


def test_an_invocation_flush_is_bounded_by_its_timeout(dripping: HostileServer) -> None:
    """A Lambda handler's flush: it returns within its timeout; the events stay counted
    (kept for the next invocation)."""
    client = klime.Client(sender=sender_for(dripping), transport="invocation")
    try:
        for i in range(3):
            client.track("E", {"i": i}, user_id="u")
        started = time.monotonic()
        result = client.flush(timeout=1)
        assert time.monotonic() - started < 1 + SLACK
        assert result.sent == 0 and result.failed == 0 and result.unsent == 3
        stats = client.stats()
        assert conserved(stats) and stats["tracked"] == 3 and stats["sent"] == 0
    finally:
        client.shutdown(timeout=0)


def test_a_background_shutdown_is_bounded_by_its_timeout(dripping: HostileServer) -> None:
    """Exit: the sender thread's call in flight ends when the shutdown's time is up."""
    errors = Recorder()
    client = klime.Client(
        sender=sender_for(dripping), transport="background", on_error=errors, flush_interval=50
    )
    for i in range(3):
        client.track("E", {"i": i}, user_id="u")
    assert dripping.wait_for_requests(1)
    started = time.monotonic()
    result = client.shutdown(1)
    assert time.monotonic() - started < 1 + SLACK
    assert result.sent == 0 and result.timed_out
    assert conserved(client.stats())


# ---------------------------------------------------------------------------------------
# normal answers still go through; a user's client is left alone


def test_a_kept_alive_connection_starts_no_thread_per_call(
    aws_keys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """By name (``localhost``): the first call looks the name up on a thread, the next calls
    reuse the connection and start no thread at all."""
    with HostileServer(accepting()) as server:
        sender = sender_for(server, host="localhost")
        first = sender.send(events(2), Deadline.after(10))
        assert first.error is None and first.failed == ()
        started: List[str] = []
        start = threading.Thread.start

        def counting_start(thread: threading.Thread) -> None:
            started.append(thread.name)
            start(thread)

        monkeypatch.setattr(threading.Thread, "start", counting_start)
        for _ in range(5):
            result = sender.send(events(3), Deadline.after(10))
            assert result.error is None and result.failed == ()
        assert started == [] and server.connections == 1 and len(server.requests) == 6


def test_moto_server_answers_through_the_bounded_connections(aws_env: None) -> None:
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        admin = boto3.client("sqs", region_name="us-east-1", endpoint_url=f"http://{host}:{port}")
        url = admin.create_queue(QueueName="klime-events")["QueueUrl"]
        sender = SqsSender(url, region_name="us-east-1", endpoint_url=f"http://{host}:{port}")
        session = sender.client._endpoint.http_session
        assert session._pool_classes_by_scheme["http"].__name__.startswith("Bounded")
        client = klime.Client(sender=sender, transport="background", max_batch_size=100)
        try:
            for i in range(150):
                client.track("E", {"i": i}, user_id=f"u{i}")
            assert client.flush(timeout=10).sent == 150
            assert conserved(client.stats())
        finally:
            client.shutdown(timeout=5)
        got = []
        for _ in range(100):
            messages = admin.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
            if not messages:
                break
            got.extend(e["properties"]["i"] for m in messages for e in json.loads(m["Body"])["batch"])
            handles = [{"Id": str(k), "ReceiptHandle": m["ReceiptHandle"]} for k, m in enumerate(messages)]
            admin.delete_message_batch(QueueUrl=url, Entries=handles)
        assert sorted(got) == list(range(150))
    finally:
        server.stop()


def test_a_users_client_is_used_as_it_is(aws_keys: None) -> None:
    """client=: klime changes neither its pool classes nor bounds its calls (documented)."""
    with HostileServer(accepting()) as server:
        given = boto3.client("sqs", region_name="us-east-1", endpoint_url=server.url)
        session = given._endpoint.http_session
        before = dict(session._pool_classes_by_scheme)
        sender = SqsSender(server.url + QUEUE_PATH, client=given)
        result = sender.send(events(2), Deadline.after(10))
        assert result.error is None
        assert session._pool_classes_by_scheme == before


def test_a_session_laid_out_otherwise_is_left_alone(aws_keys: None) -> None:
    """No ``_pool_classes_by_scheme``, or pools already made: nothing is changed."""
    assert _bound_connections(object()) is False
    assert _bound_connections(SimpleNamespace(_endpoint=SimpleNamespace(http_session=object()))) is False
    with HostileServer(accepting()) as server:
        used = boto3.client("sqs", region_name="us-east-1", endpoint_url=server.url)
        used.send_message_batch(QueueUrl=server.url + QUEUE_PATH, Entries=[{"Id": "0", "MessageBody": "x"}])
        before = dict(used._endpoint.http_session._pool_classes_by_scheme)
        assert _bound_connections(used) is False
        assert used._endpoint.http_session._pool_classes_by_scheme == before
