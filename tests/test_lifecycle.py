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
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                fresh = klime.Client("key", endpoint=client.endpoint)  # registers: takes the lock
                code = 0 if fresh in _lifecycle.clients() else 2
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.01)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the child waited for a lock held by a thread of its parent")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        holder.join(10)


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
