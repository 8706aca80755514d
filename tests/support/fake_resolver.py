"""A stand-in for ``socket.getaddrinfo`` whose names answer only when the test says so.

A real resolver that does not answer cannot be pointed at from a test without changing
``/etc/resolv.conf`` (the C library's resolver reads no other setting), so the tests
replace ``socket.getaddrinfo`` for their own duration (``pytest.MonkeyPatch``) with a
:class:`HeldResolver`: a name of its own blocks the calling thread until :meth:`release`,
then resolves to the address it stands for; any other host goes to the real resolver.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import pytest

from conftest import wait_until
from klime.senders.http import LOOKUP_THREAD_NAME


class HeldResolver:
    """Called as ``socket.getaddrinfo``. ``calls`` lists (host, thread name) of every call,
    in order; a host of ``names`` waits for :meth:`release` (at most ``hold_limit`` s, so
    that nothing hangs a broken test) and then answers for ``names[host]``; a host of
    ``unknown`` fails at once, as a name that does not exist."""

    def __init__(
        self, names: Mapping[str, str], *, unknown: Sequence[str] = (), hold_limit: float = 30.0
    ) -> None:
        self._real = socket.getaddrinfo
        self._names: Dict[str, str] = dict(names)
        self._unknown = frozenset(unknown)
        self._released = threading.Event()
        self._hold_limit = hold_limit
        self._lock = threading.Lock()
        self.calls: List[Tuple[str, str]] = []

    def __call__(
        self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        with self._lock:
            self.calls.append((str(host), threading.current_thread().name))
        if host in self._unknown:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        stands_for = self._names.get(host)
        if stands_for is None:
            return self._real(host, port, family, type, proto, flags)
        self._released.wait(self._hold_limit)
        return self._real(stands_for, port, family, type, proto, flags)

    def release(self) -> None:
        """Let every held look-up answer, now and from now on."""
        self._released.set()

    def look_ups_of(self, host: str) -> List[str]:
        """The names of the threads that looked ``host`` up."""
        with self._lock:
            return [thread for name, thread in self.calls if name == host]

    def install(self, monkeypatch: pytest.MonkeyPatch) -> HeldResolver:
        monkeypatch.setattr(socket, "getaddrinfo", self)
        return self

    def finish(self, timeout: float = 5.0) -> bool:
        """Release every held look-up and wait until no look-up thread of klime's is left."""
        self.release()
        return wait_until(
            lambda: not any(t.name == LOOKUP_THREAD_NAME for t in threading.enumerate()), timeout
        )
