"""Fork without Python's fork hooks, as uWSGI does: ``python -m apps.process.fork_nohooks``.

Run in a fresh interpreter whose only other thread is klime's sender, idle at the fork (a
thread RUNNING at such a fork can leave the child hung inside the interpreter, whatever the
library: that is why klime never runs its thread in a uWSGI master). The parent queues
events, forks with the C library's ``fork()`` (through ctypes, holding the GIL), and the
child — where only klime's pid check can see the fork — tracks and flushes its own events.
Every event is written to the ledger first. Exit status 0 when all went well.
"""

from __future__ import annotations

import ctypes
import os
import sys
import time

import klime
from apps.process import mp_jobs


def child() -> int:
    # klime.restart() is what code that forks behind klime's back may call; the pid check
    # alone would do the same at the next call.
    klime.restart()
    if mp_jobs.client.stats()["queued"] != 0:
        return 10
    mp_jobs.produce("child", 4)
    result = mp_jobs.client.flush(timeout=20)
    stats = mp_jobs.client.stats()
    if result.unsent or stats["tracked"] != 4 or stats["sent"] != 4:
        return 11
    return 0


def main() -> int:
    klime.client = mp_jobs.client  # the default client, for klime.restart()
    mp_jobs.produce("parent", 5)  # queued (flush_interval is long); the sender thread idles
    time.sleep(0.05)  # let the thread reach its timed wait
    pid = int(ctypes.PyDLL(None).fork())
    if pid == 0:
        code = 1
        try:
            code = child()
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.01)
    else:
        os.kill(pid, 9)
        print("child deadlocked", file=sys.stderr)
        return 20
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(f"child failed with {code}", file=sys.stderr)
        return 21
    if mp_jobs.client.stats()["queued"] != 5:  # the parent still owns its events
        return 22
    print(pid)
    return 0  # the parent's events go out at exit (atexit)


if __name__ == "__main__":
    sys.exit(main())
