"""Fork: the child starts with an empty queue, fresh locks, a fresh HTTP session and its own
thread; the parent keeps and sends its own events; nothing is sent twice; no deadlock, even
when the fork happens while the sender is blocked mid-request or another thread is tracking.

Children are forked from the test process and always leave through ``os._exit``; the parent
waits for them with a deadline (a child that does not finish in time is a deadlock: it is
killed and the test fails). ``os.fork()`` runs Python's fork hooks, as gunicorn and
multiprocessing do; the fork without them (as uWSGI does) is tested in a fresh interpreter
(``apps.process.fork_nohooks``): this process runs other threads (the collector's), and a
thread running while the C library forks can leave the child hung in the interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List

import pytest

import klime
from apps.process import servers
from apps.process.servers import Ledger
from conftest import WRITE_KEY, wait_until
from klime.devserver import Collector, Fault
from support.forking import fork_child, wait_child

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (3.12+)

CHILD_DEADLINE = 30.0


def tags_arrived(collector: Collector) -> List[str]:
    return [str(e["properties"]["tag"]) for e in collector.events()]


def track(client: klime.Client, tag: str) -> None:
    client.track("Fork Test", {"tag": tag}, user_id="user-1")


def child_sends(client: klime.Client, n: int) -> Callable[[], bool]:
    def body() -> bool:
        pid = os.getpid()
        for i in range(n):
            track(client, f"child-{pid}-{i}")
        result = client.flush(timeout=20)
        stats = client.stats()
        return result.unsent == 0 and stats["tracked"] == n and stats["sent"] == n

    return body


def assert_exactly_once(collector: Collector, expected: List[str]) -> None:
    assert collector.wait_for_events(len(expected), 15)
    arrived = tags_arrived(collector)
    assert sorted(arrived) == sorted(expected)
    ids = collector.message_ids()
    assert len(ids) == len(set(ids))


def test_child_starts_empty_and_parent_keeps_its_events(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    client = make_client(flush_interval=60_000)  # the parent's events stay queued
    for i in range(5):
        track(client, f"parent-{i}")
    assert client.stats()["queued"] == 5
    pid = fork_child(child_sends(client, 3))
    assert wait_child(pid, CHILD_DEADLINE) == 0
    assert collector.wait_for_events(3, 10)
    assert all(t.startswith("child-") for t in tags_arrived(collector))  # none of the parent's
    assert client.stats()["queued"] == 5
    client.flush(timeout=10)
    assert_exactly_once(collector, [f"parent-{i}" for i in range(5)] + [f"child-{pid}-{i}" for i in range(3)])


def test_fork_while_the_sender_is_blocked_mid_request(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    """The parent's sender holds its locks and a connection inside a request that never
    ends; the child must send its own events on its own connection all the same."""
    client = make_client(flush_interval=20)
    collector.respond(Fault.blackhole())
    for i in range(3):
        track(client, f"parent-{i}")
    assert wait_until(lambda: len(collector.requests()) >= 1, 10)  # stuck in the black hole
    pid = fork_child(child_sends(client, 4))
    assert wait_child(pid, CHILD_DEADLINE) == 0
    assert collector.wait_for_events(4, 10)
    collector.set_mode(None)  # release the parent's request: it is retried with the same ids
    client.flush(timeout=20)
    assert_exactly_once(collector, [f"parent-{i}" for i in range(3)] + [f"child-{pid}-{i}" for i in range(4)])


def test_fork_while_another_thread_tracks_in_a_tight_loop(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    client = make_client(flush_interval=10, max_queue_size=100_000)
    stop = threading.Event()
    produced: List[str] = []

    def tracker() -> None:
        for i in range(20_000):  # bounded
            if stop.is_set():
                return
            tag = f"parent-{i}"
            produced.append(tag)
            track(client, tag)

    thread = threading.Thread(target=tracker, name="tight-loop")
    thread.start()
    children = []
    try:
        assert wait_until(lambda: len(produced) > 100, 10)
        for _ in range(6):
            children.append(fork_child(child_sends(client, 3)))
            time.sleep(0.005)  # spread the forks over the tracker's run
        codes = [wait_child(pid, CHILD_DEADLINE) for pid in children]
    finally:
        stop.set()
        thread.join(30)
    assert codes == [0] * len(children)
    client.flush(timeout=30)
    expected = produced + [f"child-{pid}-{i}" for pid in children for i in range(3)]
    assert_exactly_once(collector, expected)
    stats = client.stats()
    assert stats["tracked"] == stats["sent"] == len(produced)


def test_child_uses_its_own_thread_and_session(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    client = make_client(flush_interval=20)
    track(client, "parent-0")
    assert collector.wait_for_events(1, 10)
    parent_thread = [t for t in threading.enumerate() if t.name == "klime-sender"]
    assert parent_thread

    def body() -> bool:
        track(client, f"child-{os.getpid()}-0")
        alive = [t for t in threading.enumerate() if t.name == "klime-sender" and t.is_alive()]
        # only the child's own thread, started by its first event
        ok = len(alive) == 1 and alive[0] is not parent_thread[0]
        return bool(client.flush(timeout=10).unsent == 0 and ok)

    pid = fork_child(body)
    assert wait_child(pid, CHILD_DEADLINE) == 0
    assert_exactly_once(collector, ["parent-0", f"child-{pid}-0"])


def test_fork_without_hooks_is_caught_by_the_pid_check(tmp_path: Path) -> None:
    """As under uWSGI: no fork hook runs; the child's first call resets it (driver
    ``apps.process.fork_nohooks``, in its own interpreter; see its docstring)."""
    ledger = Ledger(tmp_path / "ledger")
    with Collector(write_key=WRITE_KEY) as collector:
        env = servers.app_env(collector, ledger)
        env["KLIME_TEST_FLUSH_INTERVAL"] = "60000"
        done = subprocess.run(
            [sys.executable, "-m", "apps.process.fork_nohooks"],
            env=env, capture_output=True, text=True, timeout=60, cwd=str(servers.REPO),
        )
        assert done.returncode == 0, done.stderr
        d = servers.check_delivery(collector, ledger, timeout=5)
    child = int(done.stdout.split()[0])
    assert len(ledger.by_pid()[child]) == 4
    assert len(d.produced) == 9
    assert not d.missing and not d.duplicated and not d.unexpected, d.describe()
    assert len(d.message_ids) == len(set(d.message_ids))


def test_restart_without_a_fork_keeps_the_queue(
    collector: Collector, make_client: Callable[..., klime.Client]
) -> None:
    klime.client = make_client(flush_interval=60_000)
    for i in range(3):
        klime.track("Fork Test", {"tag": f"parent-{i}"}, user_id="user-1")
    klime.restart()
    klime.flush(timeout=10)
    assert collector.wait_for_events(3, 2)
