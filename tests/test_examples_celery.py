"""Smoke tests of examples/celery_app: a real Celery prefork worker (two pool processes,
kombu's filesystem broker in a temporary directory, no server) runs the example's tasks and
the local collector on 127.0.0.1 counts what arrives, by messageId.

Why prefork, although it costs seconds: it is the pool where klime's own exit hooks cannot
work (pool processes leave through ``os._exit``), so it is the one the example's
``worker_process_shutdown`` hook is for. The worker runs with a default client whose flush
interval is ten minutes and whose batches hold 100 events (set by the launcher below, not by
the example), so nothing reaches the collector except through that hook or ``track_sync``.

A warm shutdown takes Celery 2 to 4 s on this broker (its loop for brokers without async I/O
waits up to 2 s for messages between checks of the shutdown flag, twice), hence one worker
run for the SIGTERM case only.
"""

from __future__ import annotations

import collections
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from conftest import WRITE_KEY, wait_until

pytest.importorskip("celery")

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "celery_app"

# Sets the default client up so that nothing leaves on a timer or a full batch (a ten-minute
# interval, batches of 100), then runs the celery command line.
LAUNCHER = (
    "import sys, klime; "
    "klime.client = klime.Client(flush_interval=600_000, max_batch_size=100); "
    "from celery.__main__ import main; sys.argv[0] = 'celery'; sys.exit(main())"
)


@pytest.fixture
def env(src_env: Dict[str, str], collector: Any, tmp_path: Path) -> Dict[str, str]:
    return dict(
        src_env,
        KLIME_WRITE_KEY=WRITE_KEY,
        KLIME_ENDPOINT=collector.url,
        CELERY_BROKER_DIR=str(tmp_path / "broker"),
        PYTHONUNBUFFERED="1",
    )


class Worker:
    def __init__(self, env: Dict[str, str], log: Path, *options: str) -> None:
        self.log = log
        argv = [sys.executable, "-c", LAUNCHER, "-A", "tasks", "worker", "--pool", "prefork"]
        argv += ["--concurrency", "2", "--loglevel", "INFO", "--without-heartbeat", "--without-gossip"]
        argv += ["--without-mingle", *options]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(argv, cwd=EXAMPLE, env=env, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def succeeded(self) -> int:
        return len(re.findall(r"Task tasks\.\w+\[[^\]]+\] succeeded", self.text()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # pool processes die with it (Celery sets PDEATHSIG)
            self.process.wait()


@pytest.fixture
def worker(tmp_path: Path, env: Dict[str, str]) -> Iterator[Any]:
    started: List[Worker] = []

    def start(*options: str) -> Worker:
        w = Worker(env, tmp_path / f"worker{len(started)}.log", *options)
        started.append(w)
        return w

    yield start
    for w in started:
        w.close()


def enqueue(env: Dict[str, str], count: int, invoices: int) -> None:
    result = subprocess.run(
        [sys.executable, "enqueue.py", "--count", str(count), "--invoices", str(invoices)],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"queued {count} signup and {invoices} invoice_paid tasks"


def kinds(collector: Any) -> Dict[str, int]:
    return dict(collections.Counter(e.get("event", e["type"]) for e in collector.events()))


def test_the_examples_own_tests_pass_without_sending(env, collector):
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_tasks.py"],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
    assert collector.requests() == []


def test_prefork_worker_delivers_queued_events_at_warm_shutdown(worker, env, collector):
    w = worker()
    enqueue(env, count=10, invoices=2)
    assert wait_until(lambda: w.succeeded() == 12 or w.process.poll() is not None, timeout=30), w.text()
    # The invoices went with track_sync; the signups wait in the pool processes' queues.
    assert kinds(collector) == {"Invoice Paid": 2}

    w.process.send_signal(signal.SIGTERM)  # warm shutdown, as systemd/Kubernetes ask for it
    assert w.process.wait(timeout=30) == 0, w.text()

    assert collector.wait_for_events(22, timeout=10), kinds(collector)
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 22
    assert kinds(collector) == {"Invoice Paid": 2, "identify": 10, "Signup": 10}
    assert {e["userId"] for e in collector.events() if e["type"] == "identify"} == {
        f"user_{i}" for i in range(10)
    }


def test_recycled_pool_processes_flush_on_their_way_out(worker, env, collector):
    """--max-tasks-per-child 1: each pool process exits (os._exit) right after one task."""
    w = worker("--max-tasks-per-child", "1")
    enqueue(env, count=6, invoices=0)
    # Delivered while the worker is still running: only the exit hook of each recycled
    # process can have sent them (the flush interval is ten minutes).
    assert collector.wait_for_events(12, timeout=30), (kinds(collector), w.text())
    assert w.process.poll() is None
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 12
    assert kinds(collector) == {"identify": 6, "Signup": 6}
    w.close()  # nothing is left to deliver: no need to wait for a warm shutdown
    assert len(collector.events()) == 12
