"""Jobs for the multiprocessing tests. Imported by the driver (``mp_main``) and, with the
spawn and forkserver start methods, again in each child.

The module-level client is created at import: in the parent (and inherited by fork
children) or anew in each spawned child. Every event is written to the ledger
(``$KLIME_TEST_LEDGER/<pid>.log``) before it is tracked.
"""

from __future__ import annotations

import itertools
import os
import threading
from typing import List

import klime

LEDGER = os.environ["KLIME_TEST_LEDGER"]
_counter = itertools.count()
_lock = threading.Lock()

client = klime.Client(
    flush_interval=float(os.environ.get("KLIME_TEST_FLUSH_INTERVAL", "2000")), retry_initial_delay=10
)


def produce(kind: str, n: int) -> List[str]:
    """Record ``n`` events in the ledger, then track them."""
    pid = os.getpid()
    with _lock:
        tags = [f"{kind}-{pid}-{next(_counter)}" for _ in range(n)]
    with open(os.path.join(LEDGER, f"{pid}.log"), "a") as ledger:
        ledger.write("".join(tag + "\n" for tag in tags))
    for tag in tags:
        client.track("Process Test", {"tag": tag, "pid": pid}, user_id="user-1")
    return tags


def process_job(n: int) -> None:
    """A ``Process`` target: track and return (the child then exits normally)."""
    produce("process", n)


def pool_job(n: int) -> int:
    """A ``Pool`` task."""
    produce("task", n)
    return os.getpid()


def pool_job_flushed(n: int) -> int:
    """A ``Pool`` task that flushes before it returns: safe even if the pool is terminated."""
    produce("task", n)
    client.flush(timeout=5)
    return os.getpid()
