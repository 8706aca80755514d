"""uWSGI: klime's hooks into uWSGI's own life cycle.

Installed automatically when a :class:`klime.Client` is created inside uWSGI (usually at
import time of the WSGI module); call :func:`install` yourself, at import time, only to
change its options or when your clients are created later, during requests.

What the hooks do, and why (measured with uWSGI 2.0.26 and 2.0.31; see docs/uwsgi.md):

- ``uwsgi.post_fork_hook``: re-arm every client in each new worker at once (uWSGI forks
  without Python's fork hooks; klime's pid check would also catch it, at the first call).
  Without ``--master`` the process that imported the app becomes worker 1 without forking:
  the hook re-arms it too, so it may start its background thread.
- ``uwsgi.atexit``: shut every client down (flush within ``exit_timeout``) when a worker
  stops. uWSGI calls it before tearing the interpreter down, also with
  ``--skip-atexit-teardown``, where Python's ``atexit`` never runs.
- the HTTP sender's name look-ups run on a thread of their own (bounded by the attempt's
  clock) only where :func:`klime._runtime.background_threads_allowed`: never in a master
  that will fork, nor where no Python thread runs.
- ``uwsgi.after_req_hook``, only where no Python thread can run (``uwsgi.has_threads == 0``,
  i.e. uWSGI < 2.0.27 without ``--enable-threads``) or when asked: flush the queued events
  after each request, after uWSGI has closed the request's socket (the response is not
  delayed). uWSGI reads this hook once, after the app is imported: it must be installed
  during that import.

uWSGI's stop signals are held back while these hooks run: its handlers run the exit hook
from within the signal handler, on the interrupted thread, which must not be in the middle
of klime's own work (see :func:`_stop_signals_deferred`).

Hooks already set by the application are kept and called too. Nothing here runs in a
uWSGI master after it forks: uWSGI never calls Python there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Optional

from .. import _lifecycle, _runtime
from .._logging import log

__all__ = ["install", "REQUEST_FLUSH_TIMEOUT"]

#: Seconds a flush after a request may take (it keeps the worker from its next request):
#: the one default of every integration, :data:`klime._lifecycle.DEFAULT_FLUSH_TIMEOUT`.
REQUEST_FLUSH_TIMEOUT = _lifecycle.DEFAULT_FLUSH_TIMEOUT

_lock = threading.Lock()
_flush_after_request: Optional[bool] = None
_request_flush_timeout = REQUEST_FLUSH_TIMEOUT


def install(
    *,
    flush_after_request: Optional[bool] = None,
    request_flush_timeout: float = REQUEST_FLUSH_TIMEOUT,
) -> bool:
    """Install klime's uWSGI hooks in this process; False outside uWSGI.

    ``flush_after_request``: None (default) flushes after each request only where uWSGI
    runs no Python threads; True always does; False never does. ``request_flush_timeout``
    bounds that flush, in seconds. Idempotent (a later call updates the options);
    thread-safe; non-blocking. Call it at import time of your WSGI module: uWSGI reads its
    after-request hook once, right after that import.
    """
    global _flush_after_request, _request_flush_timeout
    uwsgi = _runtime.uwsgi_module()
    if uwsgi is None:
        return False
    from ..senders import http

    # a name look-up runs on a thread of its own only where a thread may run now
    http.set_lookup_thread_check(_runtime.background_threads_allowed)
    with _lock:
        _flush_after_request = flush_after_request
        _request_flush_timeout = float(request_flush_timeout)
        _chain_post_fork(uwsgi)
        _chain(uwsgi, "atexit", _at_exit, first=False)
        if _wants_request_flush():
            _chain(uwsgi, "after_req_hook", _after_request, first=False)
    return True


def _wants_request_flush() -> bool:
    """Whether to flush after each request (the ``flush_after_request`` rule). Non-blocking."""
    if _flush_after_request is None:
        return not _runtime.uwsgi_threads()
    return _flush_after_request


# ---------------------------------------------------------------------------------------
# the hooks (called by uWSGI, on its main thread)


#: The signals uWSGI stops or reloads a worker with. Its handlers call ``exit()`` from
#: within the signal handler, which runs the ``uwsgi.atexit`` hook (klime's exit flush) on
#: the interrupted thread, at once: inside whatever that thread was doing.
_STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGHUP})


@contextlib.contextmanager
def _stop_signals_deferred() -> Iterator[None]:
    """Hold uWSGI's stop signals back while klime works on the worker's main thread.

    uWSGI skips the exit hook of a worker inside a request, but not of one inside a hook:
    a stop signal landing in the middle of :func:`_post_fork` or :func:`_after_request`
    would run klime's exit flush on top of them, and the flush would wait forever for a lock
    the interrupted code holds: the worker would never end. Held back, the signal arrives
    as soon as the block is done. Blocks nothing else; a no-op where signals cannot be
    masked.
    """
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    except (AttributeError, OSError, ValueError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _post_fork() -> None:
    """In a new worker: give every client a fresh start."""
    pid = os.getpid()
    with _stop_signals_deferred():
        for client in _lifecycle.clients():
            try:
                if client._pid != pid:
                    client._check_fork()
                elif not _sending(client) and not client._closed and client.stats()["queued"] == 0:
                    # No fork happened: the importing process became worker 1 (no --master).
                    # It decided not to run a thread while it was the "master"; decide again.
                    client._restart()
            except Exception:
                log.exception("klime: re-arming a client after uWSGI's fork failed")


def _sending(client: Any) -> bool:
    """Is a sender thread of ``client`` running in this process?"""
    thread = getattr(client.transport, "_thread", None)
    return isinstance(thread, threading.Thread) and thread.is_alive()


def _at_exit() -> None:
    """A worker (or the single process) is stopping: flush and close every client."""
    _lifecycle.exit_all()


def _after_request() -> None:
    """After each request, where no thread sends: flush what the request queued (blocks
    up to ``request_flush_timeout``; never raises)."""
    if _wants_request_flush():
        with _stop_signals_deferred():  # a stop waits for this flush: it is bounded
            _lifecycle.flush_quietly(None, _request_flush_timeout, after="a uWSGI request")


# ---------------------------------------------------------------------------------------
# chaining with the application's own hooks


def _chain(uwsgi: Any, attribute: str, hook: Callable[[], None], *, first: bool = True) -> None:
    """Set ``uwsgi.<attribute>`` to call ``hook`` and the hook found there: ``hook`` first
    (re-arm before the application's code runs) or last (flush what that code tracked)."""
    previous = getattr(uwsgi, attribute, None)
    if getattr(previous, "_klime_hook", None) is hook:
        return  # already installed in this interpreter (or inherited from the master)
    if previous is not None and not callable(previous):
        previous = None

    def chained() -> None:
        if first:
            try:
                hook()
            finally:
                if previous is not None:
                    previous()
        else:
            try:
                if previous is not None:
                    previous()
            finally:
                hook()

    chained._klime_hook = hook  # type: ignore[attr-defined]
    chained.__name__ = f"klime_{attribute}"
    setattr(uwsgi, attribute, chained)
    log.debug("klime: installed uWSGI %s hook", attribute)


def _chain_post_fork(uwsgi: Any) -> None:
    """Install :func:`_post_fork`: in uwsgidecorators' chain if it owns the hook, else chained."""
    decorators = sys.modules.get("uwsgidecorators")
    chain = getattr(decorators, "postfork_chain", None) if decorators is not None else None
    if isinstance(chain, list):
        # uwsgidecorators owns uwsgi.post_fork_hook and calls this list from it.
        if _post_fork not in chain:
            chain.append(_post_fork)
        return
    _chain(uwsgi, "post_fork_hook", _post_fork, first=True)
