"""The SQS -> Klime Lambda forwarder (klime.integrations.lambda.forwarder) against the local
collector answering 200 / 5xx / 4xx, with messages produced by SqsSender into moto's SQS
(in-process ``mock_aws``) where the queue matters."""

from __future__ import annotations

import importlib
import json
import logging
import time
import uuid
from typing import Any, Dict, Iterator, List, Optional

import pytest

from conftest import WRITE_KEY
from klime import _events
from klime._batching import batch_body
from klime.devserver import Collector, Fault
from klime.errors import ConfigurationError

forwarder = importlib.import_module("klime.integrations.lambda.forwarder")
make_sqs_forwarder = forwarder.make_sqs_forwarder

REGION = "us-east-1"
ARN = f"arn:aws:sqs:{REGION}:123456789012:klime-events"
FIFO_ARN = ARN + ".fifo"


class Context:
    """The part of a Lambda context the forwarder reads."""

    def __init__(self, remaining_ms: float) -> None:
        self._ends = time.monotonic() + remaining_ms / 1000.0

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._ends - time.monotonic()) * 1000))


def encoded(n: int, tag: str = "") -> List[bytes]:
    return [_events.encode_track("E", {"i": i, "tag": tag}, f"u{i}", None) for i in range(n)]


def record(body: str, arn: str = ARN, message_id: Optional[str] = None) -> Dict[str, Any]:
    return {
        "messageId": message_id or str(uuid.uuid4()),
        "receiptHandle": "rh-" + uuid.uuid4().hex,
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": arn,
        "awsRegion": REGION,
    }


def records_of(batches: List[List[bytes]], arn: str = ARN) -> List[Dict[str, Any]]:
    return [record(batch_body(b).decode(), arn) for b in batches]


def failed_ids(answer: Dict[str, Any]) -> List[str]:
    return [item["itemIdentifier"] for item in answer["batchItemFailures"]]


def ids_of(records: List[Dict[str, Any]]) -> List[str]:
    return [r["messageId"] for r in records]


def event_ids(batches: List[List[bytes]]) -> List[str]:
    return [_events.message_id(e) for b in batches for e in b]


@pytest.fixture
def forward(collector: Collector) -> Any:
    def make(**options: Any) -> Any:
        options.setdefault("write_key", WRITE_KEY)
        options.setdefault("endpoint", collector.url)
        options.setdefault("retry_initial_delay", 1)
        return make_sqs_forwarder(**options)

    return make


# ------------------------------------------------------------------------------ with moto's SQS


@pytest.fixture
def sqs(aws_env: None) -> Iterator[Any]:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    with moto.mock_aws():
        yield boto3.client("sqs", region_name=REGION)


def enqueue_and_receive(
    sqs: Any, name: str, batches: List[List[bytes]], **options: Any
) -> List[Dict[str, Any]]:
    """Send ``batches`` with SqsSender, then receive them as Lambda's poller would."""
    from klime._deadline import Deadline
    from klime.senders.sqs import SqsSender

    attributes = {"FifoQueue": "true"} if name.endswith(".fifo") else {}
    url = sqs.create_queue(QueueName=name, Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sender = SqsSender(url, **options)
    for batch in batches:
        assert sender.send(batch, Deadline.after(10)).error is None
    out = []
    while True:
        answer = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"])
        got = answer.get("Messages")
        if not got:
            break
        for m in got:
            out.append(
                {
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                    "body": m["Body"],
                    "attributes": m.get("Attributes", {}),
                    "messageAttributes": {},
                    "md5OfBody": m["MD5OfBody"],
                    "eventSource": "aws:sqs",
                    "eventSourceARN": arn,
                    "awsRegion": REGION,
                }
            )
    assert len(out) == len(batches)
    return out


def test_200_forwards_every_event_once_in_few_requests(sqs: Any, collector: Collector, forward: Any) -> None:
    batches = [encoded(20, tag=str(k)) for k in range(5)]
    records = enqueue_and_receive(sqs, "klime-events", batches)
    answer = forward()({"Records": records}, Context(30_000))
    assert answer == {"batchItemFailures": []}
    assert sorted(collector.message_ids()) == sorted(event_ids(batches))
    assert len(collector.requests()) == 1  # five 20-event messages packed into one request


def test_500_returns_the_messages_and_a_redelivery_succeeds(
    sqs: Any, collector: Collector, forward: Any
) -> None:
    batches = [encoded(60, tag=str(k)) for k in range(3)]
    records = enqueue_and_receive(sqs, "klime-events", batches)
    handler = forward(retry_max_attempts=2)
    collector.set_mode(Fault.status_code(500))
    answer = handler({"Records": records}, Context(30_000))
    assert sorted(failed_ids(answer)) == sorted(ids_of(records))
    assert len(collector.requests()) == 2  # one request retried once, then the rest left alone
    collector.set_mode(None)
    assert handler({"Records": records}, Context(30_000)) == {"batchItemFailures": []}
    assert sorted(collector.message_ids()) == sorted(event_ids(batches))


def test_400_is_logged_and_dropped(
    sqs: Any, collector: Collector, forward: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="klime")
    batches = [encoded(60), encoded(60)]
    records = enqueue_and_receive(sqs, "klime-events", batches)
    collector.set_mode(Fault.status_code(400))
    answer = forward()({"Records": records}, Context(30_000))
    assert answer == {"batchItemFailures": []}
    assert len(collector.requests()) == 2  # each message tried once, never retried
    text = caplog.text
    assert all(r["messageId"] in text for r in records) and "dropped" in text
    assert WRITE_KEY not in text


def test_fifo_queue_returns_the_failed_message_and_all_after_it(
    sqs: Any, collector: Collector, forward: Any
) -> None:
    batches = [encoded(60, tag=str(k)) for k in range(3)]
    records = enqueue_and_receive(sqs, "klime-events.fifo", batches)
    assert records[0]["eventSourceARN"].endswith(".fifo")
    collector.respond(Fault.slow(0), Fault.status_code(503), Fault.status_code(503))
    answer = forward(retry_max_attempts=2)({"Records": records}, Context(30_000))
    assert failed_ids(answer) == ids_of(records)[1:]
    assert collector.message_ids() == event_ids(batches[:1])


# ------------------------------------------------------------------------------ outcomes


def test_transient_failure_midway_returns_the_rest(collector: Collector, forward: Any) -> None:
    batches = [encoded(60, tag=str(k)) for k in range(4)]
    records = records_of(batches)
    collector.respond(Fault.slow(0), Fault.status_code(503), Fault.status_code(429, retry_after=0))
    answer = forward(retry_max_attempts=2)({"Records": records}, Context(30_000))
    assert failed_ids(answer) == ids_of(records)[1:]
    assert collector.message_ids() == event_ids(batches[:1])
    assert len(collector.requests()) == 3


def test_401_is_dropped_or_dead_lettered(collector: Collector, forward: Any, caplog: Any) -> None:
    caplog.set_level(logging.ERROR, logger="klime")
    records = records_of([encoded(3)])
    assert forward(write_key="wrong-key")({"Records": records}, Context(30_000)) == {"batchItemFailures": []}
    assert "401" in caplog.text and "wrong-key" not in caplog.text
    answer = forward(write_key="wrong-key", dead_letter_rejected=True)({"Records": records}, Context(30_000))
    assert failed_ids(answer) == ids_of(records)
    assert collector.events() == []


def test_partially_rejected_batch_is_not_retried(collector: Collector, forward: Any) -> None:
    batches = [encoded(10)]
    collector.respond(Fault.partial(0, 5))
    answer = forward()({"Records": records_of(batches)}, Context(30_000))
    assert answer == {"batchItemFailures": []}
    expected = [m for i, m in enumerate(event_ids(batches)) if i not in (0, 5)]
    assert collector.message_ids() == expected and len(collector.requests()) == 1


def test_413_halves_the_request(collector: Collector, forward: Any) -> None:
    batches = [encoded(50), encoded(50)]
    collector.respond(Fault.status_code(413))
    assert forward()({"Records": records_of(batches)}, Context(30_000)) == {"batchItemFailures": []}
    assert sorted(collector.message_ids()) == sorted(event_ids(batches))
    assert [len(r.json()["batch"]) for r in collector.requests()] == [100, 50, 50]


def test_fifo_dead_lettered_rejection_stops_the_batch(collector: Collector, forward: Any) -> None:
    batches = [encoded(60, tag=str(k)) for k in range(3)]
    records = records_of(batches, FIFO_ARN)
    collector.respond(Fault.slow(0), Fault.status_code(400))
    answer = forward(dead_letter_rejected=True)({"Records": records}, Context(30_000))
    assert failed_ids(answer) == ids_of(records)[1:]
    assert len(collector.requests()) == 2


def test_malformed_bodies_are_dropped_and_the_rest_forwarded(
    collector: Collector, forward: Any, caplog: Any
) -> None:
    caplog.set_level(logging.ERROR, logger="klime")
    good = encoded(5)
    bad = [
        record("not json"),
        record('{"events": []}'),
        record('{"batch": [1, 2]}'),
        record('{"batch": [{"type": "track", "event": "\\ud800"}]}'),  # a lone surrogate
    ]
    records = [*bad, *records_of([good])]
    assert forward()({"Records": records}, Context(30_000)) == {"batchItemFailures": []}
    assert collector.message_ids() == event_ids([good])
    dropped = [r for r in caplog.records if "is not a Klime batch" in r.getMessage()]
    assert len(dropped) == 4 and all(r["messageId"] in caplog.text for r in bad)
    answer = forward(dead_letter_rejected=True)({"Records": records}, Context(30_000))
    assert failed_ids(answer) == ids_of(bad)


def test_a_deeply_nested_body_fails_only_its_own_record(
    collector: Collector, forward: Any, caplog: Any
) -> None:
    """``"[" * 100000 + "]" * 100000`` (and the same depth inside an event) makes json.loads
    raise RecursionError: that record is dropped (or dead-lettered), never the whole batch."""
    caplog.set_level(logging.ERROR, logger="klime")
    deep = "[" * 100_000 + "]" * 100_000
    bad = [
        record(deep),
        record('{"batch": [{"type": "track", "event": "E", "properties": {"p": ' + deep + "}}]}"),
    ]
    before, after = encoded(3, tag="before"), encoded(4, tag="after")
    records = [records_of([before])[0], *bad, records_of([after])[0]]
    assert forward()({"Records": records}, Context(30_000)) == {"batchItemFailures": []}
    assert collector.message_ids() == event_ids([before, after])
    dropped = [r.getMessage() for r in caplog.records if "is not a Klime batch" in r.getMessage()]
    assert len(dropped) == 2 and all("nested too deeply" in m for m in dropped)
    answer = forward(dead_letter_rejected=True)({"Records": records}, Context(30_000))
    assert failed_ids(answer) == ids_of(bad)
    assert collector.message_ids() == event_ids([before, after]) * 2


def test_an_oversized_foreign_message_is_split(collector: Collector, forward: Any) -> None:
    events = encoded(250)
    answer = forward()({"Records": records_of([events])}, Context(30_000))
    assert answer == {"batchItemFailures": []}
    assert [len(r.json()["batch"]) for r in collector.requests()] == [100, 100, 50]
    assert collector.message_ids() == event_ids([events])
    assert collector.events()[7] == json.loads(events[7])


def test_empty_batch_and_non_sqs_event(collector: Collector, forward: Any) -> None:
    handler = forward()
    assert handler({"Records": [record('{"batch": []}')]}, Context(30_000)) == {"batchItemFailures": []}
    assert handler({"hello": "world"}, None) == {"batchItemFailures": []}
    assert collector.requests() == []


# ------------------------------------------------------------------------------ time


def test_no_time_left_returns_everything_unsent(collector: Collector, forward: Any) -> None:
    records = records_of([encoded(3), encoded(3)])
    answer = forward(time_margin_ms=500)({"Records": records}, Context(300))
    assert failed_ids(answer) == ids_of(records)
    assert collector.requests() == []


def test_a_hung_klime_cannot_outlast_the_invocation(collector: Collector, forward: Any) -> None:
    records = records_of([encoded(60), encoded(60)])
    collector.set_mode(Fault.blackhole())
    started = time.monotonic()
    answer = forward(time_margin_ms=500)({"Records": records}, Context(1_500))
    elapsed = time.monotonic() - started
    collector.set_mode(None)
    assert failed_ids(answer) == ids_of(records)
    assert elapsed < 1.5 + 5  # bounded by the invocation, not by the 10 s read timeout


# ------------------------------------------------------------------------------ set-up


def test_warm_invocations_reuse_the_connection(collector: Collector, forward: Any) -> None:
    handler = forward()
    for k in range(3):
        answer = handler({"Records": records_of([encoded(2, tag=str(k))])}, Context(30_000))
        assert answer == {"batchItemFailures": []}
    assert len(collector.events()) == 6 and collector.connection_count() == 1


def test_ready_handler_configured_from_the_environment(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(forwarder, "_default", None)
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    batches = [encoded(4)]
    answer = forwarder.sqs_forwarder_handler({"Records": records_of(batches)}, Context(30_000))
    assert answer == {"batchItemFailures": []}
    assert collector.message_ids() == event_ids(batches)
    assert forwarder._default is not None


def test_write_key_from_ssm_named_in_the_environment(
    sqs: Any, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from klime.aws import clear_write_key_cache

    clear_write_key_cache()
    ssm = boto3.client("ssm", region_name=REGION)
    ssm.put_parameter(Name="/klime/wk", Value=WRITE_KEY, Type="SecureString")
    monkeypatch.setenv("KLIME_WRITE_KEY_SSM_PARAMETER", "/klime/wk")
    handler = make_sqs_forwarder(endpoint=collector.url)
    try:
        assert handler({"Records": records_of([encoded(2)])}, Context(30_000)) == {"batchItemFailures": []}
    finally:
        clear_write_key_cache()
    assert len(collector.events()) == 2


def test_write_key_from_a_secret_field_named_in_the_environment(
    sqs: Any, collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3

    from klime.aws import clear_write_key_cache

    clear_write_key_cache()
    boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name="klime", SecretString=json.dumps({"write_key": WRITE_KEY})
    )
    monkeypatch.setenv("KLIME_WRITE_KEY_SECRET_ID", "klime")
    monkeypatch.setenv("KLIME_WRITE_KEY_SECRET_FIELD", "write_key")
    try:
        answer = make_sqs_forwarder(endpoint=collector.url)({"Records": records_of([encoded(2)])}, None)
    finally:
        clear_write_key_cache()
    assert answer == {"batchItemFailures": []} and len(collector.events()) == 2


def test_missing_write_key_fails_the_invocation(collector: Collector) -> None:
    """No key: the invocation raises, so SQS keeps every message (nothing is dropped)."""
    handler = make_sqs_forwarder(endpoint=collector.url)
    with pytest.raises(ConfigurationError, match="KLIME_WRITE_KEY_SSM_PARAMETER"):
        handler({"Records": records_of([encoded(1)])}, Context(30_000))
    for bad in ({"write_key": ""}, {"time_margin_ms": -1}, {"sender": object()}):
        with pytest.raises(ConfigurationError):
            make_sqs_forwarder(**bad)
    assert "write" not in repr(make_sqs_forwarder(write_key=WRITE_KEY)).lower()
