"""asyncio support: awaitable ``flush``/``shutdown``/``*_sync`` on every client.

``track``/``identify``/``group`` already return in microseconds and are safe to call from a
running event loop. The calls that wait (``flush``, ``shutdown`` and the ``*_sync`` sends)
get awaitable twins on every :class:`~klime.Client` through :class:`AsyncClientMixin`::

    await client.aflush(timeout=5)
    response = await client.atrack_sync("Signup", {"plan": "pro"}, user_id="u1")

Each runs the blocking call in the loop's default executor (a worker thread), so the event
loop keeps serving while the network is slow. Cancelling the awaiting task (a timeout, a
client disconnect, a server shutting down) does not cancel the work: a flush carries on and
delivers what it started to; a ``*_sync`` send carries on too, and if it then fails, its
:class:`~klime.SendError` goes to ``on_error`` (nobody is left to catch it). Pass
``timeout=`` rather than wrapping the call in :func:`asyncio.wait_for` to bound the work
itself.

The ASGI lifespan helper ``klime.asgi_lifespan`` is an integration and lives in
:mod:`klime.integrations.asgi`; it runs its flush through :func:`run_off_loop` too.

Part of the face (layer 4). May import: the model (results, errors, the logger) and the
standard library; asyncio only inside the coroutines (it costs a Lambda cold start ~30 ms).
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any, Callable, Generic, Optional, Protocol, TypeVar, Union

if TYPE_CHECKING:
    import asyncio

from ._logging import log
from ._models import BatchResponse, FlushResult
from .errors import SendError

__all__ = ["AsyncClientMixin", "run_off_loop"]

T = TypeVar("T")

Id = Union[str, int]


class _BlockingClient(Protocol):
    """What :class:`AsyncClientMixin` needs from the class it is mixed into."""

    on_error: Any

    def flush(self, timeout: Optional[float] = None) -> FlushResult: ...

    def shutdown(self, timeout: Optional[float] = None) -> FlushResult: ...

    def track_sync(
        self,
        event: str,
        properties: Any = None,
        *,
        user_id: Optional[Id] = None,
        group_id: Optional[Id] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse: ...

    def identify_sync(
        self, user_id: Id, traits: Any = None, *, timeout: Optional[float] = None
    ) -> BatchResponse: ...

    def group_sync(
        self,
        group_id: Id,
        traits: Any = None,
        *,
        user_id: Optional[Id] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse: ...


# ---------------------------------------------------------------------------------------------
# Running a blocking call off the loop
# ---------------------------------------------------------------------------------------------


class _Call(Generic[T]):
    """One blocking call run in a worker thread for a coroutine that may stop waiting.

    When the awaiting task is cancelled the call is *abandoned*, not stopped: it runs to
    its end, and a failure nobody can receive any more is handed to ``orphaned``.
    Thread-safe: ``run`` executes in the worker, ``abandon`` on the loop's thread.
    """

    __slots__ = ("_abandoned", "_error", "_finished", "_fn", "_lock", "_orphaned", "_what")

    def __init__(
        self, fn: Callable[[], T], what: str, orphaned: Callable[[str, BaseException], None]
    ) -> None:
        self._fn = fn
        self._what = what
        self._orphaned = orphaned
        self._lock = threading.Lock()
        self._abandoned = False
        self._finished = False
        self._error: Optional[BaseException] = None

    def run(self) -> T:
        try:
            result = self._fn()
        except BaseException as exc:
            with self._lock:
                self._finished = True
                abandoned = self._abandoned
                if not abandoned:
                    self._error = exc  # abandon() may still come and report it
            if abandoned:
                self._orphaned(self._what, exc)
            raise
        with self._lock:
            self._finished = True
        return result

    def abandon(self) -> None:
        """The awaiter was cancelled: from now on, a failure is reported, not raised."""
        with self._lock:
            self._abandoned = True
            error, self._error = (self._error, None) if self._finished else (None, None)
        if error is not None:
            self._orphaned(self._what, error)


def _retrieve(future: asyncio.Future[Any]) -> None:
    # The result of an abandoned call is handled by _Call; mark it retrieved so asyncio does
    # not log "exception was never retrieved".
    if not future.cancelled():
        future.exception()


async def _in_thread(
    fn: Callable[[], T],
    what: str,
    orphaned: Callable[[str, BaseException], None],
) -> T:
    """Run ``fn`` in the loop's default executor; shield it from the awaiter's cancellation."""
    import asyncio  # here, not at import: it costs a Lambda cold start ~30 ms

    loop = asyncio.get_running_loop()
    call = _Call(fn, what, orphaned)
    inner = loop.run_in_executor(None, call.run)
    try:
        return await asyncio.shield(inner)
    except asyncio.CancelledError:
        call.abandon()
        inner.add_done_callback(_retrieve)
        log.debug("klime: %s was cancelled; the call carries on in its thread", what)
        raise


def _report_orphan(client: Any) -> Callable[[str, BaseException], None]:
    """How to report the failure of a call whose awaiter was cancelled."""

    def report(what: str, error: BaseException) -> None:
        if isinstance(error, SendError):
            log.debug("klime: %s (its awaiter was cancelled) failed: %s", what, error.message)
            client._delivery.report_error(error)
            return
        if isinstance(error, Exception):
            log.warning("klime: %s failed after its awaiter was cancelled: %r", what, error)

    return report


async def run_off_loop(client: Any, what: str, call: Callable[[], T]) -> T:
    """Await the blocking ``call`` of ``client`` (``what`` names it in log records) run in the
    loop's default executor. If the awaiter is cancelled, ``call`` still runs to its end; a
    :class:`~klime.SendError` it raises then goes to the client's ``on_error``, another error
    to the log."""
    return await _in_thread(call, what, _report_orphan(client))


# ---------------------------------------------------------------------------------------------
# The mixin
# ---------------------------------------------------------------------------------------------


class AsyncClientMixin:
    """Awaitable twins of the blocking calls of :class:`~klime.Client`.

    Each coroutine runs the blocking call in the running loop's default executor and never
    blocks the event loop; all are safe to call from many tasks at once. If the awaiting
    task is cancelled, the call keeps running to its end in its thread (events are never
    abandoned half-way); use ``timeout=`` to bound it.
    """

    __slots__ = ()

    async def aflush(self: _BlockingClient, timeout: Optional[float] = None) -> FlushResult:
        """Awaitable :meth:`~klime.Client.flush`: wait until every event recorded before the
        call is sent or reported to ``on_error``, or ``timeout`` seconds pass. Does not block
        the loop. Cancelling the awaiter does not stop the flush."""
        return await run_off_loop(self, "aflush()", functools.partial(self.flush, timeout))

    async def ashutdown(self: _BlockingClient, timeout: Optional[float] = None) -> FlushResult:
        """Awaitable :meth:`~klime.Client.shutdown`: flush (when ``flush_on_shutdown``) within
        ``timeout`` seconds, then stop. Idempotent. Does not block the loop; cancelling the
        awaiter does not stop the shutdown."""
        return await run_off_loop(self, "ashutdown()", functools.partial(self.shutdown, timeout))

    async def atrack_sync(
        self: _BlockingClient,
        event: str,
        properties: Any = None,
        *,
        user_id: Optional[Id] = None,
        group_id: Optional[Id] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Awaitable :meth:`~klime.Client.track_sync`: send one track event now.

        Returns the server's :class:`~klime.BatchResponse`; raises
        :class:`~klime.ValidationError` for bad input and :class:`~klime.SendError` when
        delivery fails. Does not block the loop. If the awaiter is cancelled the send
        completes anyway and a failure goes to ``on_error``.
        """
        send = functools.partial(
            self.track_sync, event, properties, user_id=user_id, group_id=group_id, timeout=timeout
        )
        return await run_off_loop(self, "atrack_sync()", send)

    async def aidentify_sync(
        self: _BlockingClient,
        user_id: Id,
        traits: Any = None,
        *,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Awaitable :meth:`~klime.Client.identify_sync`; see :meth:`atrack_sync`."""
        send = functools.partial(self.identify_sync, user_id, traits, timeout=timeout)
        return await run_off_loop(self, "aidentify_sync()", send)

    async def agroup_sync(
        self: _BlockingClient,
        group_id: Id,
        traits: Any = None,
        *,
        user_id: Optional[Id] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Awaitable :meth:`~klime.Client.group_sync`; see :meth:`atrack_sync`."""
        send = functools.partial(self.group_sync, group_id, traits, user_id=user_id, timeout=timeout)
        return await run_off_loop(self, "agroup_sync()", send)
