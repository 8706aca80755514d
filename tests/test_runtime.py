"""klime._runtime: what klime may do in this process (uWSGI facts read from a stand-in
``uwsgi`` module here; the real servers are in test_uwsgi.py)."""

from __future__ import annotations

import sys
import types
from typing import Iterator

import pytest

from klime import _runtime
from klime._logging import log


@pytest.fixture
def fake_uwsgi(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    module = types.SimpleNamespace(has_threads=1, worker_id=lambda: 1, opt={})
    monkeypatch.setitem(sys.modules, "uwsgi", module)  # type: ignore[arg-type]
    log.reset_once("uwsgi-threads")
    yield module
    log.reset_once("uwsgi-threads")


def test_outside_uwsgi_everything_is_allowed() -> None:
    assert "uwsgi" not in sys.modules
    assert _runtime.uwsgi_module() is None
    assert _runtime.background_threads_allowed() is True
    assert _runtime.must_send_at_once() is False
    assert _runtime.uwsgi_master() is False
    assert _runtime.uwsgi_threads() is True


def test_uwsgi_worker_with_threads_runs_the_thread(fake_uwsgi: types.SimpleNamespace) -> None:
    fake_uwsgi.worker_id = lambda: 2
    assert _runtime.background_threads_allowed() is True
    assert _runtime.must_send_at_once() is False


def test_uwsgi_master_never_runs_a_thread_and_sends_at_once(fake_uwsgi: types.SimpleNamespace) -> None:
    fake_uwsgi.worker_id = lambda: 0
    assert _runtime.uwsgi_master() is True
    assert _runtime.background_threads_allowed() is False
    assert _runtime.must_send_at_once() is True


def test_uwsgi_without_threads_warns_once_naming_the_flag(
    fake_uwsgi: types.SimpleNamespace, caplog: pytest.LogCaptureFixture
) -> None:
    fake_uwsgi.has_threads = 0
    caplog.set_level("WARNING", logger="klime")
    for _ in range(3):
        assert _runtime.background_threads_allowed() is False
    records = [r for r in caplog.records if r.name == "klime"]
    assert len(records) == 1
    assert "--enable-threads" in records[0].getMessage()
    assert _runtime.must_send_at_once() is False  # a worker: its own exit hooks still run


def test_a_broken_worker_id_is_not_a_master(fake_uwsgi: types.SimpleNamespace) -> None:
    def broken() -> int:
        raise RuntimeError("not available here")

    fake_uwsgi.worker_id = broken
    assert _runtime.uwsgi_master() is False


def test_uwsgi_environment_without_the_module_is_looked_up_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Programs started by uWSGI inherit UWSGI_ORIGINAL_PROC_NAME but have no uwsgi module."""
    monkeypatch.setenv("UWSGI_ORIGINAL_PROC_NAME", "/usr/bin/uwsgi")
    monkeypatch.setattr(_runtime, "_no_uwsgi_module", False)
    imports = []
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__

    def counting_import(name: str, *args: object, **kwargs: object) -> object:
        if name == "uwsgi":
            imports.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", counting_import)
    assert _runtime.uwsgi_module() is None
    assert _runtime.uwsgi_module() is None
    assert imports == ["uwsgi"]


@pytest.mark.parametrize(
    ("variable", "platform"),
    [("AWS_LAMBDA_FUNCTION_NAME", "aws_lambda"), ("FUNCTION_TARGET", "cloud_functions")],
)
def test_serverless_platform(monkeypatch: pytest.MonkeyPatch, variable: str, platform: str) -> None:
    assert _runtime.serverless_platform() is None
    monkeypatch.setenv(variable, "handler")
    assert _runtime.serverless_platform() == platform
