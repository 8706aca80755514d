"""SqsSender against moto's SQS (in-process ``mock_aws``): standard and FIFO queues, message
splitting at the size limit, partial SendMessageBatch failures, deadlines. Nothing leaves
this process or 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List

import pytest

from conftest import Recorder, conserved

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")
from botocore.awsrequest import AWSResponse  # noqa: E402
from botocore.exceptions import ClientError  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import klime  # noqa: E402
from klime import _events  # noqa: E402
from klime._batching import BODY_OVERHEAD, body_size, split_batches  # noqa: E402
from klime._deadline import Deadline  # noqa: E402
from klime.errors import ConfigurationError  # noqa: E402
from klime.senders._sqs_packing import (  # noqa: E402
    SQS_MAX_BATCH_BYTES,
    plan_calls,
    plan_messages,
    sqs_safe,
)
from klime.senders.sqs import SqsSender  # noqa: E402

REGION = "us-east-1"


@pytest.fixture
def sqs(aws_env: None) -> Iterator[Any]:
    with moto.mock_aws():
        yield boto3.client("sqs", region_name=REGION)


def make_queue(sqs: Any, name: str = "klime-events", **attributes: str) -> str:
    if name.endswith(".fifo"):
        attributes.setdefault("FifoQueue", "true")
    return str(sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"])


def drain(sqs: Any, url: str) -> List[Dict[str, Any]]:
    """Every message in the queue (received and deleted), in receive order."""
    out: List[Dict[str, Any]] = []
    for _ in range(1000):
        answer = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])
        got = answer.get("Messages", [])
        if not got:
            return out
        out.extend(got)
        sqs.delete_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)],
        )
    raise AssertionError("queue never drained")


def events_of(messages: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [e for m in messages for e in json.loads(m["Body"])["batch"]]


def count_calls(sender: SqsSender) -> List[List[Dict[str, Any]]]:
    """Record the entries of every SendMessageBatch call the sender's client makes."""
    calls: List[List[Dict[str, Any]]] = []

    def record(params: Dict[str, Any], **_: Any) -> None:
        calls.append([dict(e) for e in params["Entries"]])

    sender.client.meta.events.register("provide-client-params.sqs.SendMessageBatch", record)
    return calls


def encoded(n: int, pad: int = 0, **props: Any) -> List[bytes]:
    return [_events.encode_track("E", {"i": i, "pad": "x" * pad, **props}, f"u{i}", None) for i in range(n)]


# ------------------------------------------------------------------------------ through a Client


def test_standard_queue_background_transport(sqs: Any) -> None:
    """250 events through the background transport: each arrives in exactly one message."""
    url = make_queue(sqs)
    client = klime.Client(sender=SqsSender(url), transport="background", max_batch_size=100)
    try:
        for i in range(250):
            client.track("Signed Up", {"i": i}, user_id=f"user_{i}")
        result = client.flush(timeout=10)
        assert result.ok and result.sent == 250
        stats = client.stats()
        assert conserved(stats) and stats["sent"] == 250 and stats["failed"] == 0
    finally:
        client.shutdown(timeout=5)
    messages = drain(sqs, url)
    assert [len(json.loads(m["Body"])["batch"]) for m in messages] == [100, 100, 50]
    events = events_of(messages)
    assert sorted(e["properties"]["i"] for e in events) == list(range(250))
    assert len({e["messageId"] for e in events}) == 250
    assert all(m["Body"].startswith('{"batch":[') for m in messages)


def test_blocking_and_invocation_transports(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url)
    client = klime.Client(sender=sender, transport="invocation")
    try:
        response = client.track_sync("Paid", {"plan": "pro"}, user_id="u1")
        assert response.accepted == 1 and response.failed == 0
        client.identify("u1", {"email": "u1@example.com"})
        client.group("org", {"name": "Acme"}, user_id="u1")
        assert client.flush(timeout=10).sent == 2
        assert conserved(client.stats())
    finally:
        client.shutdown(timeout=5)
    assert sorted(e["type"] for e in events_of(drain(sqs, url))) == ["group", "identify", "track"]


def test_fifo_queue_group_and_deduplication_ids(sqs: Any) -> None:
    url = make_queue(sqs, "klime-events.fifo")
    sender = SqsSender(url, message_group_id="tenant-7", events_per_message=3)
    assert sender.fifo
    events = encoded(7)
    result = sender.send(events, Deadline.after(10))
    assert result.error is None and result.requests == 1
    # the same events again (a retry after an ambiguous failure): SQS drops the duplicates
    assert sender.send(events, Deadline.after(10)).error is None
    messages = drain(sqs, url)
    assert [len(json.loads(m["Body"])["batch"]) for m in messages] == [3, 3, 1]
    for message, chunk in zip(messages, (events[0:3], events[3:6], events[6:7])):
        ids = "\n".join(_events.message_id(e) for e in chunk)
        assert message["Attributes"]["MessageGroupId"] == "tenant-7"
        assert message["Attributes"]["MessageDeduplicationId"] == hashlib.sha256(ids.encode()).hexdigest()
    assert [e["messageId"] for e in events_of(messages)] == [_events.message_id(e) for e in events]


# ------------------------------------------------------------------------------ sizes


def test_message_split_exactly_at_the_size_limit(sqs: Any) -> None:
    """A message body may be exactly max_message_bytes; one byte more moves an event on."""
    limit = 262_144
    url = make_queue(sqs, MaximumMessageSize=str(limit))
    sender = SqsSender(url, max_message_bytes=limit)
    base = len(encoded(1)[0])
    first = encoded(1, pad=150_000 - base)[0]
    # body of [first, second] = overhead + len(first) + 1 + len(second) == limit
    second_size = limit - BODY_OVERHEAD - len(first) - 1
    second = _events.encode_track("E", {"i": 1, "pad": "y" * (second_size - base)}, "u1", None)
    assert body_size([first, second]) == limit
    third = encoded(1, pad=10)[0]
    calls = count_calls(sender)
    assert sender.send([first, second, third], Deadline.after(10)).error is None
    assert [len(e["MessageBody"]) for e in calls[0]] == [limit, BODY_OVERHEAD + len(third)]

    bigger = _events.encode_track("E", {"i": 1, "pad": "y" * (second_size - base + 1)}, "u1", None)
    assert sender.send([first, bigger], Deadline.after(10)).error is None
    assert len(calls) == 2 and len(calls[1]) == 2  # two messages, still one call
    bodies = [m["Body"] for m in drain(sqs, url)]
    assert sorted(len(b) for b in bodies) == sorted(
        [limit, BODY_OVERHEAD + len(third), BODY_OVERHEAD + len(first), BODY_OVERHEAD + len(bigger)]
    )


def test_a_large_batch_becomes_several_messages_in_one_call(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url)  # 256 KiB messages
    calls = count_calls(sender)
    client = klime.Client(sender=sender, transport="blocking")
    try:
        events = encoded(30, pad=30_000)  # ~900 KB: one Delivery batch, one SQS call
        response = client._sync.send(events, timeout=10)
        assert response is not None and response.accepted == 30
    finally:
        client.shutdown(timeout=5)
    assert len(calls) == 1
    sizes = [len(e["MessageBody"].encode()) for e in calls[0]]
    assert len(sizes) == 4 and max(sizes) <= 262_144 and sum(sizes) <= SQS_MAX_BATCH_BYTES
    assert len(events_of(drain(sqs, url))) == 30


def test_queue_with_smaller_maximum_message_size_is_handled_by_halving(sqs: Any) -> None:
    """The queue refuses messages above its MaximumMessageSize; Delivery halves the batch."""
    url = make_queue(sqs, MaximumMessageSize="1024")
    recorder = Recorder()
    client = klime.Client(
        sender=SqsSender(url, max_message_bytes=262_144), transport="blocking", on_error=recorder
    )
    try:
        client._sync.send(encoded(8, pad=400), timeout=10)
        stats = client.stats()
        assert recorder.calls == [] and conserved(stats) and stats["sent"] == 8
    finally:
        client.shutdown(timeout=5)
    messages = drain(sqs, url)
    assert len(messages) == 8 and all(len(m["Body"]) <= 1024 for m in messages)  # halved down to singles
    assert sorted(e["properties"]["i"] for e in events_of(messages)) == list(range(8))


def test_characters_sqs_refuses_are_escaped(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url)
    raw = _events.encode_track("E", {"odd": "a\ufffeb\uffffc", "ok": "é"}, "u", None)
    assert b"\xef\xbf\xbf" in raw and b"\xef\xbf\xbf" not in sqs_safe(raw)
    assert json.loads(sqs_safe(raw)) == json.loads(raw)
    assert sender.send([raw], Deadline.after(10)).error is None
    (message,) = drain(sqs, url)
    assert "\\uffff" in message["Body"] and "\uffff" not in message["Body"]
    assert events_of([message])[0]["properties"]["odd"] == "a\ufffeb\uffffc"


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=400), max_size=60),
    max_events=st.integers(min_value=1, max_value=12),
    max_bytes=st.integers(min_value=BODY_OVERHEAD + 1, max_value=2_000),
    entries=st.integers(min_value=1, max_value=10),
)
def test_planning_keeps_every_event_once_in_order_within_limits(
    sizes: List[int], max_events: int, max_bytes: int, entries: int
) -> None:
    events = [b"x" * n for n in sizes]
    ranges = plan_messages(events, max_events, max_bytes)
    assert [i for start, end in ranges for i in range(start, end)] == list(range(len(events)))
    assert [events[s:e] for s, e in ranges] == split_batches(events, max_events, max_bytes)
    bodies = [body_size(events[s:e]) for s, e in ranges]
    for (start, end), size in zip(ranges, bodies):
        assert end - start <= max_events
        assert size <= max_bytes or end - start == 1
    calls = plan_calls(bodies, entries, 3 * max_bytes)
    assert [i for call in calls for i in call] == list(range(len(ranges)))
    for call in calls:
        assert len(call) <= entries
        assert sum(bodies[i] for i in call) <= 3 * max_bytes or len(call) == 1


# ------------------------------------------------------------------------------ failures


class EntryFaults:
    """Make SQS fail chosen entries of the next SendMessageBatch calls.

    The chosen entries are taken out of the real request (moto never sees them) and put
    back into the answer as ``Failed``, as SQS reports a partial failure.
    """

    def __init__(self, sender: SqsSender, plan: List[Dict[str, bool]]) -> None:
        self.plan = list(plan)  # per call: {entry id: sender_fault}
        self.calls: List[List[str]] = []
        self._current: Dict[str, bool] = {}
        events = sender.client.meta.events
        events.register("provide-client-params.sqs.SendMessageBatch", self._before)
        events.register("before-call.sqs.SendMessageBatch", self._short_circuit)
        events.register("after-call.sqs.SendMessageBatch", self._after)
        self._nothing_left = False

    def _before(self, params: Dict[str, Any], **_: Any) -> None:
        self.calls.append([e["Id"] for e in params["Entries"]])
        self._current = self.plan.pop(0) if self.plan else {}
        params["Entries"] = [e for e in params["Entries"] if e["Id"] not in self._current]
        self._nothing_left = not params["Entries"]

    def _short_circuit(self, **_: Any) -> Any:
        # every entry fails: SQS would answer 200 with only Failed entries; moto refuses an
        # empty request, so answer here
        if self._nothing_left:
            return AWSResponse("http://127.0.0.1/", 200, {}, None), {"Successful": [], "Failed": []}
        return None

    def _after(self, parsed: Dict[str, Any], **_: Any) -> None:
        failed = parsed.setdefault("Failed", [])
        for entry_id, sender_fault in self._current.items():
            code = "InvalidMessageContents" if sender_fault else "InternalError"
            failed.append({"Id": entry_id, "SenderFault": sender_fault, "Code": code, "Message": "injected"})


def test_partial_failure_retries_only_the_failed_entries(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url, events_per_message=10, retry_initial_delay=10)
    faults = EntryFaults(sender, [{"1": False, "3": False}, {"3": False}])
    recorder = Recorder()
    client = klime.Client(sender=sender, transport="background", max_batch_size=50, on_error=recorder)
    try:
        for i in range(50):
            client.track("E", {"i": i}, user_id=f"u{i}")
        assert client.flush(timeout=10).sent == 50
        stats = client.stats()
    finally:
        client.shutdown(timeout=5)
    assert faults.calls == [["0", "1", "2", "3", "4"], ["1", "3"], ["3"]]
    assert recorder.calls == []
    assert stats["requests"] == 3 and stats["retries"] == 2 and conserved(stats)
    events = events_of(drain(sqs, url))
    assert sorted(e["properties"]["i"] for e in events) == list(range(50))


def test_sender_fault_entries_go_to_on_error_and_are_not_retried(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url, events_per_message=10, retry_initial_delay=10)
    faults = EntryFaults(sender, [{"2": True, "4": False}])
    recorder = Recorder()
    successes: List[klime.BatchResponse] = []
    client = klime.Client(
        sender=sender,
        transport="background",
        max_batch_size=50,
        on_error=recorder,
        on_success=successes.append,
    )
    try:
        for i in range(50):
            client.track("E", {"i": i}, user_id=f"u{i}")
        result = client.flush(timeout=10)
        stats = client.stats()
    finally:
        client.shutdown(timeout=5)
    assert faults.calls == [["0", "1", "2", "3", "4"], ["4"]]
    assert result.sent == 40 and result.failed == 10
    assert stats["sent"] == 40 and stats["failed"] == 10 and conserved(stats)
    ((error, lost),) = recorder.calls
    assert [e["properties"]["i"] for e in lost] == list(range(20, 30))
    assert "InvalidMessageContents" in error.message and not error.retryable
    assert successes[0].accepted == 40 and {e.index for e in successes[0].errors} == set(range(20, 30))
    delivered = sorted(e["properties"]["i"] for e in events_of(drain(sqs, url)))
    assert delivered == [i for i in range(50) if not 20 <= i < 30]


def test_retries_exhausted_reports_every_event(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url, retry_max_attempts=3, retry_initial_delay=1)
    faults = EntryFaults(sender, [{"0": False}] * 3)
    result = sender.send(encoded(5), Deadline.after(10))
    assert faults.calls == [["0"], ["0"], ["0"]]
    assert result.failed == (0, 1, 2, 3, 4) and result.requests == 3 and result.retries == 2
    assert result.error is not None and result.error.retryable
    assert "gave up after 3 attempts" in result.error.message
    assert not result.deadline_reached and drain(sqs, url) == []


def test_throttled_call_is_retried_whole(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url, retry_initial_delay=1)
    throttled = []

    def throttle(**_: Any) -> None:
        if not throttled:
            throttled.append(1)
            error = {
                "Error": {"Code": "RequestThrottled", "Message": "slow down"},
                "ResponseMetadata": {"HTTPStatusCode": 403},
            }
            raise ClientError(error, "SendMessageBatch")  # type: ignore[arg-type]

    sender.client.meta.events.register("before-call.sqs.SendMessageBatch", throttle)
    result = sender.send(encoded(3), Deadline.after(10))
    assert result.error is None and result.requests == 2 and result.retries == 1
    assert len(events_of(drain(sqs, url))) == 3


def test_missing_queue_is_permanent(sqs: Any) -> None:
    url = make_queue(sqs) + "-does-not-exist"
    sender = SqsSender(url, retry_initial_delay=1)
    result = sender.send(encoded(4), Deadline.after(10))
    assert result.requests == 1 and result.failed == (0, 1, 2, 3)
    assert result.error is not None and not result.error.retryable
    assert "NonExistentQueue" in result.error.message or "QueueDoesNotExist" in result.error.message
    assert result.error.status_code == 400


def test_unreachable_endpoint_is_transient_and_bounded(aws_env: None) -> None:
    """A closed port on 127.0.0.1: connection errors are retried, then reported."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = SqsSender(f"http://127.0.0.1:{port}/123456789012/q", retry_max_attempts=2, retry_initial_delay=1)
    result = sender.send(encoded(2), Deadline.after(20))
    assert result.requests == 2 and result.failed == (0, 1)
    assert result.error is not None and result.error.retryable


def test_deadline_cuts_a_hung_call_short(aws_env: None) -> None:
    """A server that accepts and never answers: the call ends at the deadline (the attempt
    clock, on every botocore; see test_senders_sqs_hostile.py for a dripping answer)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: List[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        url = f"http://127.0.0.1:{port}/123456789012/q"
        sender = SqsSender(url, read_timeout=60, retry_initial_delay=60_000)
        assert sender.client is not None  # built outside the timed part
        started = time.monotonic()
        result = sender.send(encoded(2), Deadline.after(0.5))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()
    assert elapsed < 20  # without the cap: a 60 s read timeout
    assert result.deadline_reached and result.failed == (0, 1)
    assert result.error is not None and result.error.retryable


class _AnsweringServer:
    """A raw HTTP server on 127.0.0.1 that answers every request 200 with ``body`` (SQS's
    JSON content type), one connection at a time; at most ``limit`` connections."""

    def __init__(self, body: bytes, limit: int = 20) -> None:
        self.body = body
        self.answered = 0
        self._limit = limit
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self._listener.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/123456789012/q"

    def _serve(self) -> None:
        while not self._stop.is_set() and self.answered < self._limit:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    self._answer(conn)
                except OSError:
                    continue

    def _answer(self, conn: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(rest) < length:
            chunk = conn.recv(65536)
            if not chunk:
                return
            rest += chunk
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-amz-json-1.0\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(self.body) + self.body
        )
        self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json.loads
        b'{"Successful": [{"Id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}]}",
        b"<html>502 Bad Gateway</html>",  # not JSON
        b'{"Successful": "not a list"}',
        b'{"Successful": [1, 2], "Failed": {"x": 1}}',
        b"",
    ],
    ids=["deep-nesting", "deep-inside", "html", "wrong-shape", "wrong-items", "empty"],
)
def test_an_unparseable_answer_is_a_bounded_transient_failure(aws_env: None, body: bytes) -> None:
    """A 200 whose body botocore cannot read (too deeply nested, not JSON, the wrong shape):
    send() does not raise, retries within its attempts, and reports every event failed."""
    server = _AnsweringServer(body)
    try:
        sender = SqsSender(server.url, retry_max_attempts=2, retry_initial_delay=1)
        started = time.monotonic()
        result = sender.send(encoded(3), Deadline.after(10))
        elapsed = time.monotonic() - started
    finally:
        server.close()
    assert result.failed == (0, 1, 2) and result.requests == 2
    assert result.error is not None and result.error.retryable
    assert "SQS did not accept 1 of 1 messages" in result.error.message
    assert elapsed < 10


def test_invocation_transport_keeps_events_when_the_deadline_passes(aws_env: None) -> None:
    """deadline_reached with nothing accepted: the invocation transport keeps the events."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = SqsSender(f"http://127.0.0.1:{port}/123456789012/q", retry_initial_delay=60_000)
    client = klime.Client(sender=sender, transport="invocation")
    try:
        client.track("E", user_id="u")
        result = client.flush(timeout=1)
        assert result.unsent == 1 and result.failed == 0
        assert conserved(client.stats())
    finally:
        client.shutdown(timeout=0.5)


def test_concurrent_sends_from_threads(sqs: Any) -> None:
    url = make_queue(sqs)
    sender = SqsSender(url)
    batches = [encoded(20) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: sender.send(b, Deadline.after(20)), batches))
    assert all(r.error is None for r in results)
    ids = [e["messageId"] for e in events_of(drain(sqs, url))]
    assert sorted(ids) == sorted(_events.message_id(e) for b in batches for e in b)


# ------------------------------------------------------------------------------ set-up


def test_options_are_checked(aws_env: None) -> None:
    for bad in ("", "not a url", "https://sqs.us-east-1.amazonaws.com/"):
        with pytest.raises(ConfigurationError):
            SqsSender(bad)
    url = "https://sqs.eu-west-1.amazonaws.com/123456789012/q"
    for options in ({"max_message_bytes": 100}, {"max_message_bytes": 2_000_000}, {"events_per_message": 101},
                    {"message_group_id": ""}):
        with pytest.raises(ConfigurationError):
            SqsSender(url, **options)


def test_region_and_endpoint_come_from_the_queue_url(aws_env: None) -> None:
    aws = SqsSender("https://sqs.eu-west-1.amazonaws.com/123456789012/q")
    assert aws.region_name == "eu-west-1" and aws.endpoint_url is None and not aws.fifo
    legacy = SqsSender("https://ap-south-1.queue.amazonaws.com/123456789012/q.fifo")
    assert legacy.region_name == "ap-south-1" and legacy.fifo
    local = SqsSender("http://localhost:4566/000000000000/q")
    assert local.endpoint_url == "http://localhost:4566" and local.region_name is None
    assert local.max_batch_events == 1000 and local.max_batch_bytes <= SQS_MAX_BATCH_BYTES - 9 * 11


def test_after_fork_builds_a_new_client(sqs: Any) -> None:
    sender = SqsSender(make_queue(sqs))
    first = sender.client
    sender.after_fork()
    assert sender.client is not first
    given_client = boto3.client("sqs", region_name=REGION)
    kept = SqsSender(make_queue(sqs, "other"), client=given_client)
    kept.after_fork()
    assert kept.client is given_client
    sender.close()
    sender.close()
