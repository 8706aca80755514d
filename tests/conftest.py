"""Shared fixtures: a real local collector on 127.0.0.1, clients that are always shut down,
and a clean module-level state for every test."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

import klime  # noqa: E402
from klime import _settings  # noqa: E402
from klime._logging import set_logger  # noqa: E402
from klime.devserver import Collector  # noqa: E402

WRITE_KEY = "test-write-key-0123456789"
AWS_REGION = "us-east-1"


@pytest.fixture(autouse=True)
def _clean_klime_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("KLIME_WRITE_KEY", "KLIME_ENDPOINT", "AWS_LAMBDA_FUNCTION_NAME", "FUNCTION_TARGET"):
        monkeypatch.delenv(name, raising=False)
    yield
    current = klime.client
    if current is not None:
        current.shutdown(timeout=2)
    klime.client = None
    _settings.defaults.on_error = None
    _settings.defaults.on_success = None
    set_logger(None)


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector(write_key=WRITE_KEY) as c:
        yield c


@pytest.fixture
def make_client(collector: Collector) -> Iterator[Callable[..., klime.Client]]:
    """Build clients pointed at the collector; every one is shut down after the test."""
    made: List[klime.Client] = []

    def make(**options: Any) -> klime.Client:
        options.setdefault("endpoint", collector.url)
        options.setdefault("retry_initial_delay", 10)
        client = klime.Client(options.pop("write_key", WRITE_KEY), **options)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown(timeout=2)


@pytest.fixture
def errors() -> List[Any]:
    """A list that an ``on_error=errors.append2`` style callback fills: (error, events)."""
    return []


class Recorder:
    def __init__(self) -> None:
        self.calls: List[Any] = []

    def __call__(self, *args: Any) -> None:
        self.calls.append(args)

    @property
    def events(self) -> List[dict]:
        return [e for call in self.calls for e in call[1]]


@pytest.fixture
def on_error() -> Recorder:
    return Recorder()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (a deadline, not a guess)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)


def conserved(stats: dict) -> bool:
    return stats["tracked"] == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]


@pytest.fixture
def caplog_klime(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="klime")
    return caplog


@pytest.fixture
def src_env() -> dict:
    """Environment for subprocesses that import klime from this checkout."""
    env = dict(os.environ)
    src = str(TESTS.parent / "src")
    env["PYTHONPATH"] = src + os.pathsep + str(TESTS) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake AWS credentials and region; boto3 never reads this machine's AWS config."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", AWS_REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Tests marked ``soak`` (minutes long) run only with KLIME_RUN_SOAK=1 (``make soak``)."""
    if os.environ.get("KLIME_RUN_SOAK") == "1":
        return
    skip = pytest.mark.skip(reason="a soak: run with `make soak` (KLIME_RUN_SOAK=1)")
    for item in items:
        if item.get_closest_marker("soak") is not None:
            item.add_marker(skip)
