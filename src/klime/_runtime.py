"""Facts about the process klime runs in.

Transports ask here whether a background thread may run and whether an event must be sent
at once; the serverless integrations and the default-transport choice ask which platform
this is. Nothing here imports anything heavy. Answers about uWSGI are read live from the
``uwsgi`` module (cheap attribute reads): the same interpreter is a master first and a
worker after uWSGI forks it, or becomes worker 1 itself when uWSGI runs without a master.

uWSGI in short (measured; see docs/uwsgi.md):

- the app is imported in the master (``uwsgi.worker_id() == 0``) unless ``lazy-apps``;
  uWSGI then forks workers WITHOUT running Python's fork hooks, and a Python thread that is
  running in the master at that moment can leave a worker hung: klime never starts its
  thread in a master;
- the master never runs exit hooks, neither ``atexit`` nor ``uwsgi.atexit``, and its workers
  discard what they inherit: an event tracked in the master must be sent at once;
- ``uwsgi.has_threads == 0`` (uWSGI before 2.0.27 without ``--enable-threads``): no Python
  thread ever runs, so events go out on the caller's thread.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional

from ._logging import log

__all__ = [
    "background_threads_allowed",
    "must_send_at_once",
    "serverless_platform",
    "uwsgi_module",
    "uwsgi_master",
    "uwsgi_threads",
]

THREADS_OFF_WARNING = (
    "klime: uWSGI runs without Python threads, so klime cannot send in the background: "
    "events are sent on the request's thread when max_batch_size are queued, after each "
    "request and when the worker exits. Start uWSGI with --enable-threads (or use uWSGI "
    ">= 2.0.27) to send them from klime's background thread instead."
)


_no_uwsgi_module = False


def uwsgi_module() -> Optional[Any]:
    """The ``uwsgi`` module when running inside uWSGI, else None. Non-blocking."""
    global _no_uwsgi_module
    module = sys.modules.get("uwsgi")
    if module is not None:
        return module
    if _no_uwsgi_module or not os.environ.get("UWSGI_ORIGINAL_PROC_NAME"):
        return None
    # uWSGI imports its module before the app; this variable is also inherited by
    # programs uWSGI starts, where the import fails once and is not tried again.
    try:
        import uwsgi
    except ImportError:
        _no_uwsgi_module = True
        return None
    return uwsgi  # pragma: no cover - only inside uWSGI


def uwsgi_master() -> bool:
    """True in a uWSGI process that will fork workers from itself: the master (or the
    first process without ``--master``) while it imports the app. Non-blocking."""
    uwsgi = uwsgi_module()
    if uwsgi is None:
        return False
    try:
        return int(uwsgi.worker_id()) == 0
    except Exception:
        return False


def uwsgi_threads() -> bool:
    """False inside uWSGI when Python threads cannot run (``uwsgi.has_threads == 0``)."""
    uwsgi = uwsgi_module()
    return uwsgi is None or bool(getattr(uwsgi, "has_threads", 1))


def background_threads_allowed() -> bool:
    """May klime run its sender thread in this process, now?

    False inside uWSGI when Python threads are off (the thread would never run; one
    warning names the flag that fixes it) and in a uWSGI master that will fork workers (a
    Python thread running in the master when uWSGI forks can leave a worker hung; each
    worker starts its own thread on its first event). Non-blocking; holds no lock.
    """
    if uwsgi_module() is None:
        return True
    if not uwsgi_threads():
        log.warning_once("uwsgi-threads", THREADS_OFF_WARNING)
        return False
    return not uwsgi_master()


def must_send_at_once() -> bool:
    """True where an event left in the queue would be lost: a uWSGI master before it forks.

    That process runs no exit hook, nor any code of ours after the app is imported, and
    its workers discard the events they inherit (the parent owns them): an event tracked
    there must be sent on the caller's thread before ``track`` returns. Non-blocking.
    """
    return uwsgi_master()


def serverless_platform() -> Optional[str]:
    """``"aws_lambda"``, ``"cloud_functions"`` or None, from the environment."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        return "aws_lambda"
    if os.environ.get("FUNCTION_TARGET"):
        return "cloud_functions"
    return None
