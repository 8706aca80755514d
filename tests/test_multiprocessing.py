"""klime in ``multiprocessing`` children: fork, spawn and forkserver; Process and Pool.

Children leave through ``os._exit`` (``atexit`` runs only in spawn children), so klime
flushes them through a ``multiprocessing.util.Finalize`` registered in the child. Each case
runs the driver ``apps.process.mp_main`` in a fresh interpreter and checks, from the ledger
the processes wrote, that every event of the parent and of every child arrived exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

from apps.process import servers
from apps.process.servers import Delivery, Ledger
from conftest import WRITE_KEY
from klime.devserver import Collector

METHODS = ["fork", "spawn", "forkserver"]


def run_driver(collector: Collector, ledger: Ledger, method: str, mode: str) -> Tuple[List[int], str]:
    """Run the driver to completion (60 s at most); return the children's pids and stderr."""
    env = servers.app_env(collector, ledger)
    process = subprocess.Popen(
        [sys.executable, "-m", "apps.process.mp_main", method, mode],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=str(servers.REPO),
        text=True,
    )
    try:
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        try:  # children left behind, if any
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    assert process.returncode == 0, f"driver failed ({process.returncode}):\n{err}"
    return [int(line) for line in out.split()], err


def assert_exactly_once(d: Delivery) -> None:
    assert not d.missing, d.describe()
    assert not d.duplicated, d.describe()
    assert not d.unexpected, d.describe()
    assert len(d.message_ids) == len(set(d.message_ids)), "a messageId arrived twice"
    assert not d.errors, d.describe()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", ["process", "pool"])
def test_children_flush_on_exit(method: str, mode: str, tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger")
    with Collector(write_key=WRITE_KEY) as collector:
        children, err = run_driver(collector, ledger, method, mode)
        # every process has exited: whatever was flushed has arrived
        d = servers.check_delivery(collector, ledger, timeout=2)
    assert_exactly_once(d)
    by_pid = ledger.by_pid()
    assert children and all(pid in by_pid for pid in children), (children, sorted(by_pid))
    assert len(d.produced) == 6 + (14 if mode == "process" else 40)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_terminated_pool_loses_nothing_when_tasks_flush(method: str, tmp_path: Path) -> None:
    """``with Pool() as p:`` terminates the workers (no exit hook runs); tasks that call
    ``client.flush()`` before returning have nothing left to lose (docs/multiprocessing.md)."""
    ledger = Ledger(tmp_path / "ledger")
    with Collector(write_key=WRITE_KEY) as collector:
        run_driver(collector, ledger, method, "pool-terminate")
        d = servers.check_delivery(collector, ledger, timeout=2)
    assert_exactly_once(d)
    assert len(d.produced) == 6 + 40
