"""Forking a child in a test: run a function there, then wait for it with a deadline."""

from __future__ import annotations

import os
import signal
import time
import traceback
from typing import Callable

import pytest


def fork_child(body: Callable[[], bool]) -> int:
    """Fork; the child runs ``body`` and exits 0 if it returned True, 3 if False, 2 if it
    raised (the traceback on stderr). Returns the child's pid, in the parent."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            code = 0 if body() else 3
        except BaseException:
            traceback.print_exc()
            code = 2
        finally:
            os._exit(code)
    return pid


def wait_child(pid: int, timeout: float, hung: str = "the child did not finish: a deadlock?") -> int:
    """The child's exit code; kill it and fail the test with ``hung`` if it has not exited
    within ``timeout`` seconds. Polls every 10 ms."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail(f"child {pid} did not finish within {timeout} s: {hung}")
