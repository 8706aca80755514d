"""klime in a real Celery prefork worker (filesystem broker), with klime.integrations.celery.

Pool processes leave through ``os._exit``: no ``atexit``, no multiprocessing finalizer. The
tasks track events that stay queued (``flush_interval`` is 60 s), so what arrives is only
what the hooks flush: on ``worker_process_shutdown``, or after each task.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest

from apps.process import servers
from apps.process.servers import Ledger, Server
from conftest import WRITE_KEY
from klime.devserver import Collector

celery = pytest.importorskip("celery")

pytestmark = pytest.mark.slow

# 3 events per task: no pool process can hold exactly a full batch (20), which its thread
# would send at once, so without a hook some events are always still queued at exit
TASKS, PER_TASK = 8, 3


def producer(broker_dir: Path) -> Any:
    """A Celery app that only sends tasks to the worker's filesystem broker."""
    queue = broker_dir / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    app = celery.Celery("klime_test_producer", broker="filesystem://")
    app.conf.broker_transport_options = {
        "data_folder_in": str(queue),
        "data_folder_out": str(queue),
        "control_folder": str(broker_dir / "control"),  # not ./control in the checkout
    }
    return app


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Any]:
    """Start a worker: ``start(hook, *flags)`` returns (server, ledger, collector)."""
    collectors = []
    stack = []

    def start(hook: str, *flags: str) -> Tuple[Server, Ledger, Collector]:
        collector = Collector(write_key=WRITE_KEY).start()
        collectors.append(collector)
        ledger = Ledger(tmp_path / "ledger")
        env = servers.app_env(
            collector,
            ledger,
            KLIME_TEST_BROKER_DIR=str(tmp_path / "broker"),
            KLIME_TEST_CELERY_HOOK=hook,
            KLIME_TEST_FLUSH_INTERVAL="60000",
        )
        argv = [
            sys.executable, "-m", "celery", "-A", "apps.process.celery_app", "worker",
            "--pool", "prefork", "--concurrency", "2", "--loglevel", "INFO",
            "--without-heartbeat", "--without-mingle", "--without-gossip",
            "--hostname", f"klime-test-{os.getpid()}@localhost",
            *flags,
        ]
        server = Server(argv, env, tmp_path / "worker.log", port=0).__enter__()
        stack.append(server)
        app = producer(tmp_path / "broker")
        for _ in range(TASKS):
            app.send_task("klime_test.track", args=(PER_TASK,))
        done = servers.wait_for(lambda: len(ledger.produced()) >= TASKS * PER_TASK, 90, interval=0.05)
        assert done, f"tasks did not run: {len(ledger.produced())} events\n{server.log()}"
        return server, ledger, collector

    yield start
    for server in stack:
        server.__exit__(None, None, None)
    for collector in collectors:
        collector.stop()


def pool_pids(ledger: Ledger) -> Dict[int, int]:
    return {pid: len(tags) for pid, tags in ledger.by_pid().items()}


def test_pool_processes_flush_on_shutdown(worker: Any) -> None:
    server, ledger, collector = worker("shutdown")
    assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log()
    d = servers.check_delivery(collector, ledger, timeout=2)
    assert len(d.produced) == TASKS * PER_TASK
    assert not d.missing and not d.duplicated and not d.unexpected, d.describe()
    assert len(d.message_ids) == len(set(d.message_ids))
    assert server.pid not in pool_pids(ledger)  # the tasks ran in pool processes


def test_flush_after_each_task_with_recycled_pool_processes(worker: Any) -> None:
    server, ledger, collector = worker("task", "--max-tasks-per-child", "2")
    # each task's events are out when the task ends, long before any flush interval
    arrived = collector.wait_for_events(TASKS * PER_TASK, 15)
    assert arrived, servers.check_delivery(collector, ledger, timeout=0).describe()
    assert len(pool_pids(ledger)) > 2, "pool processes were not recycled"
    assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log()
    d = servers.check_delivery(collector, ledger, timeout=2)
    assert not d.missing and not d.duplicated and not d.unexpected, d.describe()
    assert len(d.message_ids) == len(set(d.message_ids))


def test_without_the_hook_pool_processes_lose_their_queue(worker: Any) -> None:
    """Why the hook exists: billiard's ``os._exit`` skips every Python exit hook."""
    server, ledger, collector = worker("none")
    assert server.stop(signal.SIGTERM, timeout=60) == 0, server.log()
    d = servers.check_delivery(collector, ledger, timeout=1)
    assert d.missing, d.describe()
    assert not d.duplicated and not d.unexpected, d.describe()
