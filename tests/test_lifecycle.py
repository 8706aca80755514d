"""klime._lifecycle: the registry of live clients, exit hooks, fork re-arming, and the
helpers the integrations call. (Real forks: test_fork.py; real children: test_multiprocessing.py.)"""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from typing import Callable

import pytest

import klime
from conftest import WRITE_KEY
from klime import _events, _lifecycle
from klime.devserver import Collector
from support.forking import fork_child, wait_child

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (3.12+)


def test_registered_until_shutdown_then_collectable(collector: Collector) -> None:
    client = klime.Client(WRITE_KEY, endpoint=collector.url)
    assert client in _lifecycle.clients()
    assert id(client) in _lifecycle._exit_hooks
    client.shutdown(timeout=2)
    assert client not in _lifecycle.clients()
    assert id(client) not in _lifecycle._exit_hooks
    ref = weakref.ref(client)
    del client
    gc.collect()
    assert ref() is None  # no hook keeps a shut-down client alive


def test_flush_pending_flushes_every_client_with_queued_events(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    a, b, idle = (make_client(flush_interval=60_000) for _ in range(3))
    a.track("A", user_id="user-1")
    b.track("B", user_id="user-1")
    b.track("B", user_id="user-1")
    assert _lifecycle.flush_pending(10) == 0
    assert collector.wait_for_events(3, 5)
    assert a.stats()["queued"] == b.stats()["queued"] == idle.stats()["queued"] == 0


def test_flush_pending_skips_closed_clients(make_client: Callable[..., klime.Client]) -> None:
    client = make_client(flush_interval=60_000)
    client.shutdown(timeout=2)
    assert _lifecycle.flush_pending(1) == 0


def test_flush_quietly_flushes_one_client_or_several_and_counts(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    a, b = make_client(flush_interval=60_000), make_client(flush_interval=60_000)
    a.track("A", user_id="user-1")
    assert _lifecycle.flush_quietly(a, 10) == _lifecycle.FlushTotals(sent=1, unsent=0, failed_clients=0)
    a.track("A", user_id="user-1")
    b.track("B", user_id="user-1")
    b.track("B", user_id="user-1")
    assert _lifecycle.flush_quietly([a, b], 10) == _lifecycle.FlushTotals(sent=3, unsent=0, failed_clients=0)
    assert collector.wait_for_events(4, 5)


def test_flush_quietly_logs_a_failing_client_flushes_the_others_and_never_raises(
    collector: Collector,
    make_client: Callable[..., klime.Client],
    caplog_klime: pytest.LogCaptureFixture,
) -> None:
    broken, good = make_client(flush_interval=60_000), make_client(flush_interval=60_000)

    def fails(timeout: object = None) -> None:
        raise RuntimeError("boom")

    broken.flush = fails  # type: ignore[method-assign,assignment]
    good.track("G", user_id="user-1")
    totals = _lifecycle.flush_quietly([broken, good], 10, after="a test request", note="; all is well")
    assert totals == _lifecycle.FlushTotals(sent=1, unsent=0, failed_clients=1)
    errors = [r for r in caplog_klime.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert errors[0].getMessage() == "klime: the flush after a test request failed; all is well"


def test_flush_quietly_keeps_its_deadline_and_warns_once_about_what_stays_queued(
    collector: Collector,
    make_client: Callable[..., klime.Client],
    caplog_klime: pytest.LogCaptureFixture,
) -> None:
    from klime._logging import log
    from klime.devserver import Fault

    log.reset_once("test-flush-quietly-unsent")
    client = make_client(flush_interval=60_000)
    collector.set_mode(Fault.blackhole())  # Klime never answers: every flush times out
    try:
        for _ in range(2):
            client.track("Held", user_id="user-1")
            started = time.monotonic()
            totals = _lifecycle.flush_quietly(client, 0.3, unsent_warning_key="test-flush-quietly-unsent")
            assert time.monotonic() - started < 3
            assert totals.unsent >= 1 and totals.failed_clients == 0
    finally:
        collector.set_mode(None)
    warnings = [r.getMessage() for r in caplog_klime.records if r.levelname == "WARNING"]
    assert warnings == [
        "klime: events still queued after a flush after the work (timeout 0.3s); they stay queued "
        "and are sent later"
    ]
    assert WRITE_KEY not in caplog_klime.text
    assert client.flush(timeout=10).unsent == 0  # nothing was lost: sent once Klime answers
    assert len(set(collector.message_ids())) == 2


def test_flush_quietly_of_every_client_skips_idle_and_closed_ones(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    busy, idle, closed = (make_client(flush_interval=60_000) for _ in range(3))
    closed.shutdown(timeout=2)
    calls = []
    for client in (idle, closed):
        client.flush = lambda timeout=None, c=client: calls.append(c)  # type: ignore[method-assign,misc]
    busy.track("B", user_id="user-1")
    assert _lifecycle.flush_quietly(None, 10).sent == 1
    assert calls == []


def test_one_default_flush_timeout_for_every_integration() -> None:
    import importlib

    from klime.integrations import _serverless, asgi, celery, flask, uwsgi, wsgi

    default = _lifecycle.DEFAULT_FLUSH_TIMEOUT
    assert default == 2.0
    aliases = [
        wsgi.FLUSH_TIMEOUT,
        asgi.FLUSH_TIMEOUT,
        flask.DEFAULT_FLUSH_TIMEOUT,
        uwsgi.REQUEST_FLUSH_TIMEOUT,
        celery.TASK_FLUSH_TIMEOUT,
        _serverless.DEFAULT_FLUSH_TIMEOUT,
    ]
    assert all(alias is default for alias in aliases)
    lambda_package = importlib.import_module("klime.integrations.lambda")
    assert lambda_package.klime_lambda.__kwdefaults__["flush_timeout"] is default
    assert klime.klime_cloud_function.__kwdefaults__["flush_timeout"] is default


def test_exit_all_shuts_every_client_down_once(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    a, b = make_client(flush_interval=60_000), make_client(flush_interval=60_000)
    a.track("A", user_id="user-1")
    b.track("B", user_id="user-1")
    _lifecycle.exit_all()
    assert collector.wait_for_events(2, 5)
    assert a._closed and b._closed
    _lifecycle.exit_all()  # nothing left to do
    assert len(collector.events()) == 2


def test_rearm_in_the_process_that_queued_keeps_the_queue(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    client = make_client(flush_interval=60_000)
    client.track("A", user_id="user-1")
    _lifecycle.rearm()
    assert client.stats()["queued"] == 1
    client.flush(timeout=5)
    assert collector.wait_for_events(1, 5)


def test_a_lock_copied_by_a_hookless_fork_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a fork without Python's hooks (uWSGI) the copied lock may be held forever."""
    held = threading.Lock()
    held.acquire()
    monkeypatch.setattr(_lifecycle, "_lock", held)
    monkeypatch.setattr(_lifecycle, "_lock_pid", os.getpid() + 1)  # "another process's lock"
    lock = _lifecycle._guard()
    assert lock is not held and not lock.locked()
    assert _lifecycle.clients() is not None  # does not block
    held.release()


def test_fork_while_another_thread_holds_the_registry_lock(make_client: Callable[..., klime.Client]) -> None:
    client = make_client()
    release = threading.Event()
    taken = threading.Event()

    def hold() -> None:
        with _lifecycle._guard():
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert taken.wait(10)
    try:

        def child() -> bool:
            fresh = klime.Client("key", endpoint=client.endpoint)  # registers: takes the lock
            return fresh in _lifecycle.clients()

        pid = fork_child(child)
        assert wait_child(pid, 20, "it waited for a lock held by a thread of its parent") == 0
    finally:
        release.set()
        holder.join(10)


def test_a_fork_waits_for_an_import_another_thread_has_in_progress(
    make_client: Callable[..., klime.Client], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child forked while a thread (klime's sender, importing the HTTP library at its
    first send) is importing a module gets that module whole, not half imported."""
    import importlib
    import sys

    make_client()  # the wait is for processes with a live client
    name = "klime_test_slow_import"
    entered = tmp_path / "entered"
    (tmp_path / f"{name}.py").write_text(
        "import pathlib, time\n"
        f"pathlib.Path({str(entered)!r}).write_text('x')\n"
        "time.sleep(0.3)\n"
        "done = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    importer = threading.Thread(target=importlib.import_module, args=(name,))
    importer.start()
    try:
        deadline = time.monotonic() + 10
        while not entered.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert entered.exists()
        started = time.monotonic()
        pid = fork_child(lambda: getattr(importlib.import_module(name), "done", False))
        waited = time.monotonic() - started
        # a child waiting for the import lock of a thread it does not have never ends
        assert wait_child(pid, 10, "it inherited a module half imported by another thread") == 0
        assert waited < _lifecycle.FORK_IMPORT_WAIT_S
    finally:
        importer.join(10)
        sys.modules.pop(name, None)


def test_message_ids_are_reseeded_in_a_process_that_did_not_seed_them(
    monkeypatch: pytest.MonkeyPatch, make_client: Callable[..., klime.Client]
) -> None:
    """uWSGI: klime imported in the master, the client created in a worker, no fork hook."""
    monkeypatch.setattr(_lifecycle, "_ids_pid", os.getpid() + 1)
    before = _events._rng.getstate()
    make_client()
    assert _events._rng.getstate() != before
    assert _lifecycle._ids_pid == os.getpid()
    again = _events._rng.getstate()
    make_client()  # same process: no reseed
    assert _events._rng.getstate() == again
