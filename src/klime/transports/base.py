"""The Transport interface: WHEN events go.

A transport receives encoded events from the Client (``submit``) and decides when to hand
them to the :class:`~klime._delivery.Delivery` (which owns the sender, WHERE they go). The
Client never knows which transport it holds; a transport never knows the wire format.
"""

from __future__ import annotations

import abc
from typing import Dict, Optional, Sequence

from .._delivery import Delivery
from .._models import BatchResponse, FlushResult

__all__ = ["SyncTransport", "Transport"]


class Transport(abc.ABC):
    """Base class of transports.

    Thread-safety: ``submit`` may be called from any number of threads at once and must
    return in microseconds (no I/O, no waiting on a lock held during I/O) — except in
    transports whose point is to send on the caller's thread (``blocking``). ``flush`` and
    ``shutdown`` block up to ``timeout`` seconds (None: no limit) and are thread-safe.
    """

    #: The name the Client's ``transport=`` option accepts for this class, if any.
    name: str = ""
    #: Load the sender's stack (the HTTP library) when the client is made, on its thread
    #: (True: long-running processes), or on the first send (False: serverless, where
    #: start-up time is the caller's latency).
    prepare_sender_early: bool = True

    _delivery: Optional[Delivery] = None

    def attach(self, delivery: Delivery) -> None:
        """Called once by the Client before the first ``submit``: this transport delivers
        through ``delivery``, whose ledger reads its :meth:`counts`."""
        if self._delivery is not None and self._delivery is not delivery:
            raise RuntimeError("this transport already belongs to another klime Client")
        self._delivery = delivery
        delivery.ledger.hold(self)  # stats() reads what this transport holds
        if self.prepare_sender_early:
            try:
                delivery.sender.prepare()
            except Exception:  # a sender that cannot prepare tells at its first send
                pass

    @property
    def delivery(self) -> Delivery:
        if self._delivery is None:
            raise RuntimeError("transport used before a klime Client attached it")
        return self._delivery

    @abc.abstractmethod
    def submit(self, event: bytes) -> bool:
        """Accept one encoded event. Returns False when it was not accepted (closed)."""

    @abc.abstractmethod
    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Send everything accepted before the call; block until done or ``timeout``."""

    @abc.abstractmethod
    def shutdown(self, timeout: Optional[float] = None, *, flush: bool = True) -> FlushResult:
        """Flush (when ``flush``) then stop; later ``submit`` calls return False.

        Events not sent by the deadline (or at all, with ``flush=False``) are reported to
        ``on_error`` and counted. Idempotent.
        """

    def sync_transport(self) -> Optional[SyncTransport]:
        """The transport for this client's ``*_sync`` calls, if this one wants to serve
        them itself (the memory transport records them); None: a blocking transport."""
        return None

    def begin_invocation(self) -> None:
        """A serverless decorator's invocation starts (``klime.integrations``): from now on
        the decorator flushes after the handler. The invocation transport then stops
        sending inline; the others have nothing to do. Non-blocking, thread-safe."""

    def counts(self) -> Dict[str, int]:
        """``accepted``: events taken by ``submit``; ``pending``: not yet resolved;
        optionally ``dropped``: events the transport dropped (and counted) itself."""
        return {"accepted": 0, "pending": 0}

    def after_fork(self) -> None:
        """Called in a forked child before first use: forget the parent's events and
        threads, make fresh locks. The parent keeps (and sends) its own events."""

    def at_exit(self, timeout: float, flush: bool) -> None:
        """Called when the process exits (``atexit`` or a multiprocessing finalizer)."""
        self.shutdown(timeout, flush=flush)


class SyncTransport(Transport):
    """A transport that can also deliver a batch now, on the caller's thread: what serves a
    client's ``*_sync`` calls (the blocking transport; the memory transport, which records
    them)."""

    @abc.abstractmethod
    def send(self, events: Sequence[bytes], timeout: Optional[float] = None) -> Optional[BatchResponse]:
        """Deliver ``events`` now and return the server's answer; raise
        :class:`~klime.SendError` when they were not all accepted. None (nothing sent) once
        the transport is shut down. Blocks up to ``timeout`` seconds; thread-safe."""
