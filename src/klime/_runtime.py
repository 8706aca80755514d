"""Facts about the process klime runs in, looked up once and cached.

Transports ask here whether a background thread may run; the serverless integrations and
the default-transport choice ask which platform this is. Nothing here imports anything
heavy, and nothing is looked up until asked.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

from ._logging import log

__all__ = ["background_threads_allowed", "serverless_platform", "uwsgi_module"]


def uwsgi_module() -> Optional[object]:
    """The ``uwsgi`` module when running inside uWSGI, else None."""
    module = sys.modules.get("uwsgi")
    if module is not None:
        return module
    if "uwsgidecorators" not in sys.modules and not os.environ.get("UWSGI_ORIGINAL_PROC_NAME"):
        # uWSGI always imports its module before the app; outside uWSGI there is none.
        try:
            import uwsgi  # type: ignore[import-not-found]
        except ImportError:
            return None
        return uwsgi  # pragma: no cover - only inside uWSGI
    return None


def background_threads_allowed() -> bool:
    """May klime run its sender thread in this process, now?

    False inside uWSGI when Python threads are off (``uwsgi.has_threads == 0``: the thread
    would never run; one warning names the flag that fixes it) and in a uWSGI master that
    will fork workers (a Python thread running in the master when uWSGI forks can leave a
    worker hung; the worker starts its own thread on its first event).
    """
    uwsgi = uwsgi_module()
    if uwsgi is None:
        return True
    if not getattr(uwsgi, "has_threads", 1):
        log.warning_once(
            "uwsgi-threads",
            "klime: uWSGI runs without Python threads, so events are sent on the request's "
            "thread when a batch fills and at flush (use klime's WSGI middleware or "
            "klime.flush() at request end). Start uWSGI with --enable-threads to send in "
            "the background.",
        )
        return False
    try:
        worker_id = uwsgi.worker_id()  # type: ignore[attr-defined]
    except Exception:
        worker_id = 1
    if worker_id == 0:  # the master, before it forks workers
        return False
    return True


def serverless_platform() -> Optional[str]:
    """``"aws_lambda"``, ``"cloud_functions"`` or None, from the environment."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        return "aws_lambda"
    if os.environ.get("FUNCTION_TARGET"):
        return "cloud_functions"
    return None
