"""End to end across processes: a klime client in one process hands events to SQS (moto in
server mode on 127.0.0.1), and the forwarder, run by the real awslambdaric runtime under the
test Runtime API emulator, delivers every event exactly once to the local collector, through
Klime faults that send messages back to the queue."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from conftest import WRITE_KEY

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
pytest.importorskip("werkzeug")  # moto[server]
import botocore  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from klime.devserver import Collector, Fault  # noqa: E402
from support.lambda_emulator import LambdaEmulator  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("awslambdaric") is None, reason="awslambdaric is not installed"
    ),
    pytest.mark.skipif(
        tuple(int(p) for p in botocore.__version__.split(".")[:3]) < (1, 31, 0),
        reason="botocore < 1.31 does not read AWS_ENDPOINT_URL, which the emulated Lambda needs "
        "to reach moto",
    ),
]

REGION = "us-east-1"
EVENTS = 400
HANDLER = "klime.integrations.lambda.forwarder.sqs_forwarder_handler"

PRODUCER = r"""
import json, sys
import klime
from klime.senders.sqs import SqsSender

queue_url, count = sys.argv[1], int(sys.argv[2])
ids = []
client = klime.Client(
    sender=SqsSender(queue_url),
    transport="background",
    max_batch_size=20,
    on_error=lambda error, events: sys.exit("on_error: %s" % error),
)
for i in range(count):
    client.track("Order Placed", {"i": i}, user_id="user_%d" % (i % 7))
result = client.shutdown(timeout=30)
stats = client.stats()
assert result.ok and stats["sent"] == count, (result, stats)
print(json.dumps({"stats": stats}))
"""


def aws_environment(base: Dict[str, str], tmp_path: Path) -> Dict[str, str]:
    env = {k: v for k, v in base.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    return env


@pytest.fixture
def moto_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in aws_environment({}, tmp_path).items():
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def lambda_records(messages: List[Dict[str, Any]], arn: str) -> List[Dict[str, Any]]:
    """What Lambda's SQS poller hands the function for received messages."""
    return [
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
        for m in messages
    ]


def test_client_to_sqs_to_forwarder_to_klime_exactly_once(
    moto_server: str, collector: Collector, src_env: Dict[str, str], tmp_path: Path
) -> None:
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=moto_server)
    url = sqs.create_queue(QueueName="klime-e2e", Attributes={"VisibilityTimeout": "30"})["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    env = aws_environment(src_env, tmp_path)

    # 1. a producer process hands EVENTS events to SQS, 20 per message
    produced = subprocess.run(
        [sys.executable, "-c", PRODUCER, url, str(EVENTS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert produced.returncode == 0, produced.stderr
    assert json.loads(produced.stdout)["stats"]["sent"] == EVENTS

    # 2. Klime misbehaves at first: the first invocation's first request gets 500 three
    #    times (its retries are spent, every message goes back to the queue); later a 503
    #    is absorbed by a retry inside the invocation.
    collector.respond(
        Fault.status_code(500), Fault.status_code(500), Fault.status_code(500),
        Fault.slow(0), Fault.status_code(503),
    )  # fmt: skip

    # 3. the forwarder in a real Lambda runtime; this test plays Lambda's SQS poller
    #    (its write key comes from SSM at cold start, from the same moto server)
    ssm = boto3.client("ssm", region_name=REGION, endpoint_url=moto_server)
    ssm.put_parameter(Name="/klime/e2e/write-key", Value=WRITE_KEY, Type="SecureString")
    runtime_env = {
        "PYTHONPATH": src_env["PYTHONPATH"],
        "AWS_ENDPOINT_URL": moto_server,
        "KLIME_WRITE_KEY_SSM_PARAMETER": "/klime/e2e/write-key",
        "KLIME_ENDPOINT": collector.url,
    }
    returned = 0
    invocations = 0
    with LambdaEmulator(HANDLER, cwd=str(tmp_path), env=runtime_env, timeout_s=30) as emu:
        for _ in range(100):  # bounded: 3 rounds are needed
            got = sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, AttributeNames=["All"], WaitTimeSeconds=0
            ).get("Messages", [])
            if not got:
                break
            invocation = emu.invoke({"Records": lambda_records(got, arn)}, timeout=60)
            invocations += 1
            assert invocation.ok, emu.log_tail()
            failed = {item["itemIdentifier"] for item in invocation.payload["batchItemFailures"]}
            returned += len(failed)
            done = [m for m in got if m["MessageId"] not in failed]
            if done:
                sqs.delete_message_batch(
                    QueueUrl=url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(done)],
                )
            for m in got:  # what Lambda leaves on the queue shows up again (no 30 s wait here)
                if m["MessageId"] in failed:
                    sqs.change_message_visibility(
                        QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
                    )
        else:
            pytest.fail("the queue never drained")

    ids = collector.message_ids()
    assert len(ids) == EVENTS and len(set(ids)) == EVENTS  # every event, exactly once
    assert sorted(e["properties"]["i"] for e in collector.events()) == list(range(EVENTS))
    assert returned == 10  # the first invocation gave all its messages back
    assert invocations == EVENTS // 20 // 10 + 1
    statuses = [r.status for r in collector.requests()]
    assert statuses.count(500) == 3 and statuses.count(503) == 1
