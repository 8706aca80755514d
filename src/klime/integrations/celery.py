"""Celery: flush klime's events when a prefork pool process stops, and optionally after
each task.

Celery's prefork pool (billiard) ends its child processes with ``os._exit``: neither
``atexit`` nor multiprocessing's finalizers run there, so events still queued in a child
when it stops — at worker shutdown, or when ``--max-tasks-per-child`` recycles it — would
be lost. One line in the module that creates your Celery app fixes that::

    from klime.integrations.celery import connect
    connect()                        # flush when each pool process stops
    connect(flush_after_task=True)   # ... and after every task (each task's events out
                                     # before the next one starts; costs a round trip)

Importing this module imports nothing from Celery; :func:`connect` imports
``celery.signals``. The handlers act on every live klime client of the process (the
default client and any you created).

An integration (top layer). May import: process life (``_lifecycle``), Celery (inside
:func:`connect`/:func:`disconnect`) and the standard library.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from .. import _lifecycle

__all__ = ["connect", "disconnect", "TASK_FLUSH_TIMEOUT"]

#: Seconds a flush after a task may take, by default: the one default of every integration,
#: :data:`klime._lifecycle.DEFAULT_FLUSH_TIMEOUT` (2 s; formerly 5 s here: events a shorter
#: wait leaves queued are not lost, they go with the next flush or the exit flush).
TASK_FLUSH_TIMEOUT = _lifecycle.DEFAULT_FLUSH_TIMEOUT

_lock = threading.Lock()
_task_flush_timeout: Optional[float] = TASK_FLUSH_TIMEOUT


def connect(
    *, flush_after_task: bool = False, task_flush_timeout: Optional[float] = TASK_FLUSH_TIMEOUT
) -> None:
    """Connect klime to Celery's worker signals. Idempotent; thread-safe; non-blocking.

    - ``worker_process_init``: re-arm the clients in each new pool process (klime also
      detects the fork by itself; this makes it immediate);
    - ``worker_process_shutdown`` (in each pool process) and ``worker_shutdown`` (in the
      main worker process): shut every client down, flushing within its ``exit_timeout``;
    - with ``flush_after_task``, ``task_postrun``: flush the events queued so far, within
      ``task_flush_timeout`` seconds (default 2; None: no limit).

    Raises ImportError when Celery is not installed.
    """
    global _task_flush_timeout
    from celery import signals

    with _lock:
        _task_flush_timeout = task_flush_timeout
        signals.worker_process_init.connect(_process_init, weak=False, dispatch_uid="klime.process_init")
        signals.worker_process_shutdown.connect(
            _process_shutdown, weak=False, dispatch_uid="klime.process_shutdown"
        )
        signals.worker_shutdown.connect(_process_shutdown, weak=False, dispatch_uid="klime.worker_shutdown")
        if flush_after_task:
            signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid="klime.task_postrun")
        else:
            signals.task_postrun.disconnect(_task_postrun, dispatch_uid="klime.task_postrun")


def disconnect() -> None:
    """Undo :func:`connect`. Idempotent; thread-safe; non-blocking."""
    from celery import signals

    with _lock:
        signals.worker_process_init.disconnect(_process_init, dispatch_uid="klime.process_init")
        signals.worker_process_shutdown.disconnect(_process_shutdown, dispatch_uid="klime.process_shutdown")
        signals.worker_shutdown.disconnect(_process_shutdown, dispatch_uid="klime.worker_shutdown")
        signals.task_postrun.disconnect(_task_postrun, dispatch_uid="klime.task_postrun")


def _process_init(**_: Any) -> None:
    """``worker_process_init``: re-arm the clients this pool process inherited."""
    _lifecycle.rearm()


def _process_shutdown(**_: Any) -> None:
    """``worker_process_shutdown``/``worker_shutdown``: flush and close every client
    (blocks up to each client's ``exit_timeout``)."""
    _lifecycle.exit_all()


def _task_postrun(**_: Any) -> None:
    """``task_postrun``: flush what the task queued (blocks up to ``task_flush_timeout``)."""
    _lifecycle.flush_quietly(None, _task_flush_timeout, after="a Celery task")
