"""The capture machinery behind :func:`~klime.testing.capture`: while one is active, every
new :class:`~klime.Client` gets a capturing memory transport (through the transports'
override hook), and the default client is swapped for a capturing one.

May import: the face (``Client``, the default client), the transports, the senders' base,
the model, :mod:`._captured` and the standard library — never the ``klime`` package.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Sequence, Tuple

from .. import _default
from .._client import Client
from .._deadline import Deadline
from ..errors import SendError
from ..senders.base import Sender, SendResult
from ..transports import MemoryTransport
from ..transports import _choice as _transports
from ._captured import CapturedEvents

__all__ = ["capture"]

#: Captures active right now, outermost first. Replaced (never mutated) under _state_lock.
_active: Tuple[CapturedEvents, ...] = ()
_state_lock = threading.RLock()


class _CapturingTransport(MemoryTransport):
    """A memory transport that also hands each event to every active capture.

    Used both as a client's transport and as its ``*_sync`` transport (``send``).
    """

    def submit(self, event: bytes) -> bool:
        if not super().submit(event):
            return False
        for sink in _active:
            sink._record(event)
        return True


class _NoNetworkSender(Sender):
    """The sender of the capturing default client: never used, refuses if it ever is."""

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        error = SendError("klime.testing: this client sends nothing")
        return SendResult(None, error, tuple(range(len(events))))


def _start(captured: CapturedEvents) -> None:
    global _active
    with _state_lock:
        if not _active:
            # every Client created from now on records instead of sending; its ``*_sync``
            # calls go to the same memory transport (MemoryTransport.sync_transport)
            _transports.set_transport_override(_CapturingTransport)
        _active = (*_active, captured)


def _stop(captured: CapturedEvents) -> None:
    global _active
    with _state_lock:
        _active = tuple(c for c in _active if c is not captured)
        if not _active:
            _transports.set_transport_override(None)


@contextlib.contextmanager
def capture() -> Iterator[CapturedEvents]:
    """Record, instead of sending, every event of every Client created inside the block.

    Also swaps the default client ``klime.client`` for a capturing one (restored on exit),
    so ``klime.track()`` and friends are captured without a write key. Captures nest: an
    event is recorded by every capture active when it is made. Not blocking; thread-safe,
    but the capture is process-wide (events from every thread are recorded).
    """
    captured = CapturedEvents()
    _start(captured)
    previous = _default.current()
    default = None
    try:
        default = Client(sender=_NoNetworkSender())
        captured.client = default
        _default.replace(default)
        yield captured
    finally:
        _default.replace(previous)  # also when the code under test replaced it meanwhile
        _stop(captured)
        if default is not None:
            default.shutdown(timeout=0)
        captured.client = None
