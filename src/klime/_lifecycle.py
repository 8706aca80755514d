"""Process life: fork detection and exit hooks for every live Client.

Fork is detected two ways: ``os.register_at_fork`` (through a weak set, so a hook never
keeps a client alive) and a pid comparison at every Client entry point, for servers such as
uWSGI that fork without running Python's fork hooks. Nothing here holds a lock across a
fork: the child makes its own lock before it looks at anything. Before a fork, imports
that other threads have in progress are waited for (briefly), so that a child never
inherits a module half imported by a klime thread (:func:`_before_fork`).

At exit every client that was not shut down explicitly is shut down with its
``exit_timeout``:

- by ``atexit`` in a normally exiting interpreter;
- by a ``multiprocessing`` finalizer in multiprocessing children (fork, spawn and
  forkserver), which leave through ``os._exit`` and never run ``atexit``. The finalizer is
  registered in the child itself: at client creation when the client is made there, and
  through multiprocessing's after-fork callbacks for clients the child inherited or made
  while its main module was being imported (``multiprocessing`` clears the finalizers it
  finds at that point, then runs those callbacks);
- by uWSGI's own hooks inside uWSGI (see :mod:`klime.integrations.uwsgi`, installed through
  a hook the ``klime`` package registers with :func:`add_register_hook`), and by the Celery
  integration in Celery's pool processes, which also leave through ``os._exit``.

The helpers :func:`clients`, :func:`flush_pending`, :func:`exit_all` and :func:`rearm` act
on every live client of this process; :func:`flush_quietly` (with its one default,
:data:`DEFAULT_FLUSH_TIMEOUT`) is the flush after a request, a task or an invocation that
every integration uses.

Layer: process life, below the transports and the face. It knows a client only through
the :class:`ManagedClient` protocol and runs higher layers' code only through hooks they
register (:func:`add_register_hook`). May import: the model (``_events``, ``_deadline``,
``_logging``) only.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import weakref
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Protocol, Union

from . import _events
from ._deadline import Deadline
from ._logging import log

__all__ = [
    "ManagedClient",
    "add_register_hook",
    "register",
    "unregister",
    "clients",
    "DEFAULT_FLUSH_TIMEOUT",
    "FlushTotals",
    "flush_quietly",
    "flush_pending",
    "exit_all",
    "rearm",
]


class ManagedClient(Protocol):
    """What process life (and the integrations built on it) use of a client."""

    _closed: bool
    _pid: int

    @property
    def transport(self) -> Any: ...

    def stats(self) -> Dict[str, int]: ...

    def flush(self, timeout: Optional[float] = None) -> Any: ...

    def _check_fork(self) -> None: ...

    def _restart(self) -> None: ...

    def _at_exit(self) -> None: ...


Client = ManagedClient  # the name the signatures below read best with

_clients: weakref.WeakSet[Any] = weakref.WeakSet()
_register_hooks: List[Callable[[], None]] = []
_exit_hooks: Dict[int, Callable[[], None]] = {}
_lock = threading.Lock()
_lock_pid = os.getpid()

#: multiprocessing finalizers run in descending priority; run ours before the pool's own.
_MP_EXIT_PRIORITY = 20

#: The process whose message-id generator this is. uWSGI forks without Python's fork
#: hooks: a worker that imported klime's modules from its master (``--lazy-apps`` with
#: ``--import``, or any master-side import) and creates its own client must not reuse the
#: master's sequence — every worker would send the same messageIds.
_ids_pid = os.getpid()

#: Set once multiprocessing's after-fork registry holds our callback. Inherited by forked
#: children together with the registry itself, so it is registered once per process tree
#: (and again in each spawned interpreter).
_mp_after_fork_registered = False


def _guard() -> threading.Lock:
    """This process's lock. After a fork that ran no Python hook (uWSGI) the copied lock
    may be held by a thread that does not exist here: make a new one."""
    global _lock, _lock_pid
    pid = os.getpid()
    if _lock_pid != pid:
        _lock = threading.Lock()
        _lock_pid = pid
    return _lock


def add_register_hook(hook: Callable[[], None]) -> None:
    """Have ``hook`` called each time a client is registered (after its own set-up): how a
    layer above installs what its runtime needs (the uWSGI hooks). It must be idempotent and
    cheap; what it raises is logged, never passed on. Not thread-safe: call at import."""
    if hook not in _register_hooks:
        _register_hooks.append(hook)


def register(client: Client) -> None:
    """Watch ``client`` for forks and shut it down at exit. Thread-safe, non-blocking."""
    global _ids_pid
    pid = os.getpid()
    if _ids_pid != pid:
        _events.reseed()
        _ids_pid = pid
    hook = _exit_hook(client)
    with _guard():
        _clients.add(client)
        _exit_hooks[id(client)] = hook
    atexit.register(hook)
    if "multiprocessing" in sys.modules:
        _register_mp_after_fork()
        _register_mp_finalizer(hook)
    for extra in list(_register_hooks):
        try:
            extra()
        except Exception:  # never let exit plumbing break a client
            log.exception("klime: a process-life hook failed")


def unregister(client: Client) -> None:
    """Forget ``client`` (after an explicit shutdown): nothing more to do at exit."""
    with _guard():
        _clients.discard(client)
        hook = _exit_hooks.pop(id(client), None)
    if hook is not None:
        atexit.unregister(hook)


def interpreter_exiting() -> bool:
    """Is the interpreter on its way out (``atexit`` handlers running, or finalizing)?

    ``threading`` marks the main thread as finished before it runs ``atexit`` handlers, so
    an application's own handler (klime 1.x's ``atexit.register(client.shutdown)``) sees
    False from ``main_thread().is_alive()``. Non-blocking, thread-safe.
    """
    return sys.is_finalizing() or not threading.main_thread().is_alive()


def clients() -> List[Client]:
    """Every live, registered client of this process (a new list). Thread-safe."""
    with _guard():
        return list(_clients)


# ---------------------------------------------------------------------------------------
# what the integrations call

#: Seconds a flush after one unit of work (a web request, a Celery task, a serverless
#: invocation) may take by default, in every integration. It bounds how long the worker
#: waits before its next unit; events not sent by then stay queued and go with the next
#: flush, the background thread or the exit flush, so a longer wait only helps during an
#: outage, where it would slow every request or task down. A normal round trip is far
#: below it.
DEFAULT_FLUSH_TIMEOUT = 2.0

#: Once-per-process key of :func:`flush_quietly`'s warning about events left unsent.
UNSENT_WARNING_KEY = "flush-after-work-unsent"


class FlushTotals(NamedTuple):
    """What :func:`flush_quietly` achieved: events ``sent``, events still ``unsent`` when
    it returned, and ``failed_clients``, the clients whose flush raised (logged)."""

    sent: int = 0
    unsent: int = 0
    failed_clients: int = 0


def flush_quietly(
    target: Union[Client, Iterable[Client], None] = None,
    timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT,
    *,
    after: str = "the work",
    note: str = "",
    unsent_warning_key: Optional[str] = UNSENT_WARNING_KEY,
) -> FlushTotals:
    """Flush after a unit of work, within one deadline ``timeout`` seconds from now (None:
    until sent or retries run out), and never raise: what every integration calls.

    ``target``: one client, several (flushed one after the other, each whatever is left of
    the deadline), or None for every live client of the process that has queued events.
    A client whose flush raises is logged ("the flush after ``after`` failed" + ``note``)
    and the others are flushed still. Events left unsent stay queued for a later flush;
    that is logged once per process under ``unsent_warning_key`` (None: not at all) and at
    debug level every time.

    Blocks up to ``timeout``; thread-safe (each client's flush is); never raises.
    """
    deadline = Deadline.after(timeout)
    sent = unsent = failed_clients = 0
    try:
        if target is None:
            chosen: Iterable[Client] = [c for c in clients() if not c._closed and c.stats()["queued"]]
        elif isinstance(target, Iterable):
            chosen = target
        else:
            chosen = [target]
        for client in chosen:
            try:
                result = client.flush(deadline.remaining())
            except Exception:
                failed_clients += 1
                log.exception("klime: the flush after %s failed%s", after, note)
                continue
            sent += result.sent
            unsent += result.unsent
    except Exception:  # listing the clients failed: nothing more to do
        log.exception("klime: the flush after %s failed%s", after, note)
    if unsent:
        if unsent_warning_key is not None:
            log.warning_once(
                unsent_warning_key,
                "klime: events still queued after a flush after %s (timeout %ss); they stay "
                "queued and are sent later",
                after,
                timeout,
            )
        log.debug("klime: %d events still queued after the flush after %s", unsent, after)
    return FlushTotals(sent, unsent, failed_clients)


def flush_pending(timeout: Optional[float] = None) -> int:
    """Flush every live client that has queued events, within one ``timeout`` (seconds):
    :func:`flush_quietly` of every client, without its warning. Returns how many events
    were still unsent when it returned. Blocks up to ``timeout``; thread-safe; never raises.
    """
    return flush_quietly(None, timeout, after="a flush of every client", unsent_warning_key=None).unsent


def exit_all() -> None:
    """Shut down every client not shut down yet, each within its ``exit_timeout``.

    For a process about to leave without running ``atexit`` (uWSGI's and Celery's exit
    hooks call it). Blocks; never raises; later calls do nothing for clients already done.
    """
    for client in clients():
        client._at_exit()


def rearm() -> None:
    """Re-arm every live client in this process after a fork (``klime.restart()``).

    A client whose process changed starts afresh (empty queue, fresh locks, connections
    and thread); in the process that created it, a client is left as it is: its queue is
    its own. Idempotent, thread-safe; blocks only briefly.
    """
    for client in clients():
        client._check_fork()


# ---------------------------------------------------------------------------------------
# exit hooks


def _exit_hook(client: Client) -> Callable[[], None]:
    # A strong reference: a client that was never shut down is still flushed at exit,
    # even when the application kept no reference to it.
    def klime_exit_flush() -> None:
        client._at_exit()

    return klime_exit_flush


def _register_mp_finalizer(hook: Callable[[], None]) -> None:
    """In a multiprocessing child, make sure ``hook`` runs on its ``os._exit`` path."""
    mp = sys.modules.get("multiprocessing")
    if mp is None:
        return
    try:
        if mp.parent_process() is None:
            return
        from multiprocessing import util

        util.Finalize(None, hook, exitpriority=_MP_EXIT_PRIORITY)
    except Exception:  # never let exit plumbing break a client
        pass


def _register_mp_after_fork() -> None:
    """Have multiprocessing call :func:`_mp_reregister` in each child it starts.

    A child's bootstrap clears the finalizers it finds (inherited, or registered while the
    main module was imported in a spawned child) and then runs the after-fork callbacks:
    ours registers a finalizer for every live client again.
    """
    global _mp_after_fork_registered
    if _mp_after_fork_registered:
        return
    try:
        from multiprocessing import util

        util.register_after_fork(_MP_TOKEN, _mp_reregister)
        _mp_after_fork_registered = True
    except Exception:
        pass


class _MpToken:
    """A weak-referenceable key for multiprocessing's after-fork registry."""


_MP_TOKEN = _MpToken()


def _mp_reregister(_token: Any) -> None:
    with _guard():
        hooks = [_exit_hooks[id(c)] for c in list(_clients) if id(c) in _exit_hooks]
    for hook in hooks:
        _register_mp_finalizer(hook)


# ---------------------------------------------------------------------------------------
# fork


def _after_fork_in_child() -> None:
    global _lock, _lock_pid, _ids_pid
    # Another thread of the parent may have held the lock at the fork: never wait on it.
    _lock = threading.Lock()
    _lock_pid = _ids_pid = os.getpid()  # klime._events re-seeds itself in its own fork hook
    found = list(_clients)
    for client in found:
        try:
            client._check_fork()
        except Exception:
            log.exception("klime: re-arming a client after fork failed")
    if found and "multiprocessing.util" in sys.modules:
        # multiprocessing runs its after-fork callbacks in its own children after this
        # hook: make sure ours is among them (see _register_mp_after_fork).
        _register_mp_after_fork()


#: Longest wait, at a fork, for imports that other threads have in progress (seconds).
FORK_IMPORT_WAIT_S = 2.0


def _initializing(module: object) -> bool:
    try:
        return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))
    except Exception:  # an exotic object in sys.modules
        return False


def _before_fork() -> None:
    """Wait (at most :data:`FORK_IMPORT_WAIT_S`) until no other thread is importing a
    module. A fork in the middle of another thread's import leaves the child with that
    module partially initialized for ever: every later import of it fails there with
    ImportError. klime's sender threads import the HTTP library at their first send, which
    in a preforking server's master (gunicorn ``--preload``) can coincide with a fork; the
    worker could then never send. Only in a process with a live client; imports in
    progress on the forking thread itself are not waited for. Blocks briefly; holds no lock."""
    if not _clients:
        return
    own = set()
    frame = sys._getframe(1)
    while frame is not None:  # modules being executed by this thread (an import in progress)
        own.add(frame.f_globals.get("__name__"))
        frame = frame.f_back  # type: ignore[assignment]
    deadline = time.monotonic() + FORK_IMPORT_WAIT_S
    while time.monotonic() < deadline:
        if not any(
            _initializing(module) and name not in own for name, module in list(sys.modules.items())
        ):
            return
        time.sleep(0.001)


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
