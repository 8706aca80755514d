"""Process life: fork detection and exit hooks for every live Client.

Fork is detected two ways: ``os.register_at_fork`` (through a weak set, so a hook never
keeps a client alive) and a pid comparison at every Client entry point, for servers such as
uWSGI that fork without running Python's fork hooks.

At exit every client that was not shut down explicitly is shut down with its
``exit_timeout``: by ``atexit`` in a normally exiting interpreter, and by a
``multiprocessing`` finalizer in multiprocessing children, which leave through
``os._exit`` and never run ``atexit``.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["register", "unregister"]

_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()
_exit_hooks: Dict[int, Callable[[], None]] = {}
_lock = threading.Lock()

#: multiprocessing finalizers run in descending priority; run ours before the pool's own.
_MP_EXIT_PRIORITY = 20


def register(client: Client) -> None:
    """Watch ``client`` for forks and shut it down at exit."""
    hook = _exit_hook(client)
    with _lock:
        _clients.add(client)
        _exit_hooks[id(client)] = hook
    atexit.register(hook)
    _register_mp_finalizer(hook)


def unregister(client: Client) -> None:
    """Forget ``client`` (after an explicit shutdown): nothing more to do at exit."""
    with _lock:
        _clients.discard(client)
        hook = _exit_hooks.pop(id(client), None)
    if hook is not None:
        atexit.unregister(hook)


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


def _after_fork_in_child() -> None:
    with _lock:
        clients = list(_clients)
    for client in clients:
        client._check_fork()
    # multiprocessing clears its finalizers in the child after this hook runs, then calls
    # its own after-fork callbacks: register ours there so they survive.
    util = sys.modules.get("multiprocessing.util")
    if util is not None and clients:
        try:
            util.register_after_fork(_MpReRegister, _mp_reregister)  # type: ignore[attr-defined]
        except Exception:
            pass


class _MpReRegisterType:
    """A weak-referenceable token for multiprocessing's after-fork registry."""


_MpReRegister = _MpReRegisterType()


def _mp_reregister(_token: Any) -> None:
    with _lock:
        hooks = [_exit_hooks[id(c)] for c in list(_clients) if id(c) in _exit_hooks]
    for hook in hooks:
        _register_mp_finalizer(hook)


os.register_at_fork(after_in_child=_after_fork_in_child)
