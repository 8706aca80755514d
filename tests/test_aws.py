"""klime.aws: the write key from SSM / Secrets Manager (moto in-process), the boto3-free
``import klime``, and the install hint when boto3 is missing."""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
import threading
from typing import Any, Dict, Iterator, List

import pytest

import klime
from klime import aws
from klime.aws import (
    INSTALL_HINT,
    MissingDependencyError,
    clear_write_key_cache,
    write_key_from_secret,
    write_key_from_ssm,
)
from klime.errors import ConfigurationError, KlimeError

REGION = "us-east-1"


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_write_key_cache()
    yield
    clear_write_key_cache()


@pytest.fixture
def moto_aws(aws_env: None) -> Iterator[Any]:
    pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    with moto.mock_aws():
        yield moto


def boto(service: str, region: str = REGION) -> Any:
    import boto3

    return boto3.client(service, region_name=region)


# ------------------------------------------------------------------------------ no boto3 needed

_PROBE = """
import importlib, sys
import klime, klime.aws, klime.senders, klime.integrations
from klime.senders import SqsSender
importlib.import_module("klime.integrations.lambda.forwarder")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "s3transfer"))
print("LOADED:" + ",".join(loaded))
"""


def test_import_klime_does_not_import_boto3(src_env: Dict[str, str]) -> None:
    """``python -X importtime -c "import klime"`` lists no boto3/botocore module; neither do
    the AWS modules themselves until an AWS feature is used."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import klime"],
        env=src_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if "|" in line]
    assert "klime" in imported
    assert not [m for m in imported if m.split(".")[0] in ("boto3", "botocore")]

    probe = subprocess.run(
        [sys.executable, "-c", _PROBE], env=src_env, capture_output=True, text=True, timeout=60
    )
    assert probe.returncode == 0, probe.stderr
    assert "LOADED:\n" in probe.stdout


def test_missing_boto3_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # "import boto3" now raises ImportError
    from klime.senders import SqsSender

    for call in (
        lambda: write_key_from_ssm("/klime/key"),
        lambda: write_key_from_secret("klime"),
        lambda: SqsSender("https://sqs.us-east-1.amazonaws.com/123456789012/q"),
    ):
        with pytest.raises(MissingDependencyError) as info:
            call()
        assert INSTALL_HINT in str(info.value) and 'pip install "klime[aws]"' in str(info.value)
        assert isinstance(info.value, ImportError)
        assert isinstance(info.value, ConfigurationError) and isinstance(info.value, KlimeError)


def test_missing_boto3_in_the_forwarder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setenv("KLIME_WRITE_KEY_SSM_PARAMETER", "/klime/key")
    forwarder = importlib.import_module("klime.integrations.lambda.forwarder")
    handler = forwarder.make_sqs_forwarder(endpoint="http://127.0.0.1:9")
    with pytest.raises(MissingDependencyError, match=r"klime\[aws\]"):
        handler({"Records": []}, None)


def test_names_are_checked() -> None:
    for bad in ("", "  ", None, 3):
        with pytest.raises(ConfigurationError):
            write_key_from_ssm(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            write_key_from_secret(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        write_key_from_secret("s", key="")


# ------------------------------------------------------------------------------ SSM


def test_ssm_secure_string_is_read_once_and_cached(moto_aws: Any) -> None:
    ssm = boto("ssm")
    ssm.put_parameter(Name="/prod/klime/write-key", Value="wk_live_123", Type="SecureString")
    assert write_key_from_ssm("/prod/klime/write-key") == "wk_live_123"
    ssm.delete_parameter(Name="/prod/klime/write-key")
    # cached for the life of the process: no second request
    assert write_key_from_ssm("/prod/klime/write-key") == "wk_live_123"
    clear_write_key_cache()
    with pytest.raises(ConfigurationError, match="does not exist"):
        write_key_from_ssm("/prod/klime/write-key")


def test_ssm_decrypt_false_returns_the_stored_form(moto_aws: Any) -> None:
    boto("ssm").put_parameter(Name="plain", Value=" wk_plain \n", Type="String")
    assert write_key_from_ssm("plain", decrypt=False) == "wk_plain"


def test_ssm_missing_parameter_is_a_clear_error_and_not_cached(moto_aws: Any) -> None:
    with pytest.raises(ConfigurationError) as info:
        write_key_from_ssm("/nope/klime")
    assert "SSM parameter '/nope/klime' does not exist" in str(info.value)
    assert "ParameterNotFound" in str(info.value)
    boto("ssm").put_parameter(Name="/nope/klime", Value="wk_later", Type="SecureString")
    assert write_key_from_ssm("/nope/klime") == "wk_later"


def test_ssm_parameter_by_arn_uses_the_arn_region(moto_aws: Any) -> None:
    boto("ssm", "eu-west-1").put_parameter(Name="/klime/eu", Value="wk_eu", Type="SecureString")
    arn = "arn:aws:ssm:eu-west-1:123456789012:parameter/klime/eu"
    assert write_key_from_ssm(arn) == "wk_eu"


def test_one_fetch_when_threads_ask_at_once(moto_aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    boto("ssm").put_parameter(Name="/klime/shared", Value="wk_shared", Type="SecureString")
    made: List[str] = []
    real = aws._make_client

    def counting(service: str, region: Any, what: str, timeout: Any) -> Any:
        made.append(service)
        return real(service, region, what, timeout)

    monkeypatch.setattr(aws, "_make_client", counting)
    results: List[str] = []
    barrier = threading.Barrier(8)

    def worker() -> None:
        barrier.wait(10)
        results.append(write_key_from_ssm("/klime/shared"))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["wk_shared"] * 8 and made == ["ssm"]


def test_access_denied_is_a_clear_error(moto_aws: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """moto checks IAM once its unauthenticated set-up calls are used up."""
    from moto.core import set_initial_no_auth_action_count

    @set_initial_no_auth_action_count(4)
    def run() -> None:
        iam = boto("iam")
        iam.create_user(UserName="no-rights")
        key = iam.create_access_key(UserName="no-rights")["AccessKey"]
        boto("ssm").put_parameter(Name="/klime/locked", Value="wk_locked", Type="SecureString")
        boto("secretsmanager").create_secret(Name="klime-locked", SecretString="wk_locked")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        with pytest.raises(ConfigurationError) as ssm_error:
            write_key_from_ssm("/klime/locked")
        with pytest.raises(ConfigurationError) as secret_error:
            write_key_from_secret("klime-locked")
        assert "access denied reading SSM parameter '/klime/locked'" in str(ssm_error.value)
        assert "ssm:GetParameter" in str(ssm_error.value)
        assert "access denied reading secret 'klime-locked'" in str(secret_error.value)
        for error in (ssm_error.value, secret_error.value):
            assert "wk_locked" not in str(error) and "<" not in str(error)

    run()


def test_no_region_and_no_credentials(aws_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both fail before any request (instance metadata look-ups are disabled)."""
    pytest.importorskip("boto3")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(ConfigurationError, match="no AWS region") as info:
        write_key_from_ssm("/klime/key")
    assert "set AWS_DEFAULT_REGION" in str(info.value)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigurationError, match="no AWS credentials"):
        write_key_from_secret("klime")


# ------------------------------------------------------------------------------ Secrets Manager


def test_secret_string_plain_and_json_field(moto_aws: Any) -> None:
    sm = boto("secretsmanager")
    sm.create_secret(Name="klime/plain", SecretString="wk_plain_1")
    sm.create_secret(Name="klime/json", SecretString='{"write_key": "wk_json_2", "other": "x"}')
    assert write_key_from_secret("klime/plain") == "wk_plain_1"
    assert write_key_from_secret("klime/json", key="write_key") == "wk_json_2"
    assert write_key_from_secret("klime/json", "other") == "x"
    sm.delete_secret(SecretId="klime/plain", ForceDeleteWithoutRecovery=True)
    assert write_key_from_secret("klime/plain") == "wk_plain_1"  # cached


def test_secret_binary(moto_aws: Any) -> None:
    boto("secretsmanager").create_secret(Name="klime/bin", SecretBinary=b"wk_binary_3")
    assert write_key_from_secret("klime/bin") == "wk_binary_3"


def test_secret_shape_errors_never_show_the_value(moto_aws: Any) -> None:
    sm = boto("secretsmanager")
    sm.create_secret(Name="klime/json", SecretString='{"other": "s3cr3t-value"}')
    sm.create_secret(Name="klime/text", SecretString="s3cr3t-value")
    sm.create_secret(Name="klime/num", SecretString='{"write_key": 12345}')
    cases = [
        (lambda: write_key_from_secret("klime/json"), "pass key="),
        (lambda: write_key_from_secret("klime/json", key="write_key"), "has no field 'write_key'"),
        (lambda: write_key_from_secret("klime/text", key="write_key"), "is not a JSON object"),
        (lambda: write_key_from_secret("klime/num", key="write_key"), "is not a non-empty string"),
        (lambda: write_key_from_secret("klime/missing"), "does not exist"),
    ]
    for call, expected in cases:
        with pytest.raises(ConfigurationError) as info:
            call()
        assert expected in str(info.value)
        assert "s3cr3t" not in str(info.value) and "12345" not in str(info.value)


def test_client_uses_the_key(moto_aws: Any, collector: Any) -> None:
    """The documented pattern end to end: key from SSM, events to the local collector."""
    from conftest import WRITE_KEY

    boto("ssm").put_parameter(Name="/prod/klime", Value=WRITE_KEY, Type="SecureString")
    client = klime.Client(write_key_from_ssm("/prod/klime"), endpoint=collector.url, transport="blocking")
    try:
        assert client.track_sync("Deployed", user_id="ops").accepted == 1
    finally:
        client.shutdown(timeout=2)
    assert [e["event"] for e in collector.events()] == ["Deployed"]


def test_the_region_hint_names_the_variable_boto3_reads(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside Lambda boto3 reads AWS_DEFAULT_REGION, not AWS_REGION: with only AWS_REGION
    set there is still no region, and the message says which variable to set; setting it
    then works."""
    pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", REGION)
    with pytest.raises(ConfigurationError) as info:
        write_key_from_secret("klime")
    message = str(info.value)
    assert "no AWS region" in message and "set AWS_DEFAULT_REGION" in message
    assert "set AWS_REGION" not in message
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with moto.mock_aws():
        boto("secretsmanager").create_secret(Name="klime", SecretString="wk_region")
        assert write_key_from_secret("klime") == "wk_region"


# ------------------------------------------------------------------------------ logging


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> List[str]:
        out = []
        for record in self.records:
            out.append(record.getMessage())
            if record.exc_info:
                out.append(logging.Formatter().formatException(record.exc_info))
        return out


@pytest.fixture
def debug_logging() -> Iterator[_Capture]:
    """Every logger at DEBUG into one capturing handler (as logging.basicConfig(level=DEBUG)
    plus boto3.set_stream_logger would), restored afterwards."""
    capture = _Capture()
    root = logging.getLogger()
    names = ("botocore", "boto3", "urllib3")
    levels = {name: logging.getLogger(name).level for name in names}
    root_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    for name in names:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(root_level)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_debug_logging_never_shows_the_fetched_key(moto_aws: Any, debug_logging: _Capture) -> None:
    ssm_secret, sm_secret = "wk_ssm_" + "7" * 20, "wk_sm_" + "9" * 20
    boto("ssm").put_parameter(Name="/klime/debug", Value=ssm_secret, Type="SecureString")
    boto("secretsmanager").create_secret(Name="klime/debug", SecretString=json.dumps({"wk": sm_secret}))
    # The capture is live: botocore logs a response body with the secret in it when the
    # user's own code reads it (not klime's business, and proof that the test can see it).
    boto("ssm").get_parameter(Name="/klime/debug", WithDecryption=True)
    assert any(ssm_secret in text for text in debug_logging.texts())
    debug_logging.records.clear()

    assert write_key_from_ssm("/klime/debug") == ssm_secret
    assert write_key_from_secret("klime/debug", key="wk") == sm_secret
    texts = debug_logging.texts()
    assert texts, "nothing was logged at all: the capture is not working"
    assert [t for t in texts if ssm_secret in t or sm_secret in t] == []
    assert any("write key read from" in t for t in texts)  # klime's own line, without the key

    # Only the look-up's own thread is quiet: botocore logs as usual for other calls afterwards.
    debug_logging.records.clear()
    boto("ssm").get_parameter(Name="/klime/debug", WithDecryption=True)
    assert any(ssm_secret in text for text in debug_logging.texts())


@pytest.mark.parametrize("lookup", ["ssm", "secret"])
def test_a_lookup_is_bounded_in_wall_clock_time(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, lookup: str
) -> None:
    """An endpoint that answers one byte every 0.3 s (each within botocore's read timeout)
    cannot hold a look-up past its ``timeout``; the failure names the look-up and the bound."""
    import functools
    import time

    from support.hostile_server import HostileServer, answer, response

    body = b'{"Parameter": {"Value": "wk_never"}}' if lookup == "ssm" else b'{"SecretString": "wk_never"}'
    with HostileServer(answer(response(200, body), every=0.3)) as server:
        monkeypatch.setattr(aws, "_make_client", functools.partial(aws._make_client, endpoint_url=server.url))
        started = time.monotonic()
        with pytest.raises(ConfigurationError) as caught:
            if lookup == "ssm":
                write_key_from_ssm("/klime/slow", timeout=1.0)
            else:
                write_key_from_secret("klime/slow", timeout=1.0)
        took = time.monotonic() - started
        assert server.requests, "the look-up never reached the server"
    assert took < 1.0 + 0.6, f"{took:.2f}s for a 1 s timeout"
    assert "no answer within 1 s" in str(caught.value) and "wk_never" not in str(caught.value)
    aws.clear_write_key_cache()
