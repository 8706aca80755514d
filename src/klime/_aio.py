"""asyncio support: awaitable ``flush``/``shutdown``/``*_sync`` and an ASGI lifespan helper.

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

:func:`asgi_lifespan` wraps an ASGI application so that the server's lifespan shutdown
flushes the client without blocking the loop, also for apps that do not speak the lifespan
protocol themselves (Django's ASGI handler, plain callables).

This module imports only the standard library and klime's own small modules.
"""

from __future__ import annotations

import functools
import threading
from typing import (
    TYPE_CHECKING,
    Any,
    Awaitable,
    Callable,
    Generic,
    MutableMapping,
    Optional,
    Protocol,
    TypeVar,
    Union,
)

if TYPE_CHECKING:
    import asyncio

from ._logging import log
from ._models import BatchResponse, FlushResult
from .errors import SendError

__all__ = ["ASGIApp", "AsyncClientMixin", "asgi_lifespan"]

T = TypeVar("T")

Id = Union[str, int]

#: ASGI types (the ASGI 3 single-callable form).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
        return await _in_thread(functools.partial(self.flush, timeout), "aflush()", _report_orphan(self))

    async def ashutdown(self: _BlockingClient, timeout: Optional[float] = None) -> FlushResult:
        """Awaitable :meth:`~klime.Client.shutdown`: flush (when ``flush_on_shutdown``) within
        ``timeout`` seconds, then stop. Idempotent. Does not block the loop; cancelling the
        awaiter does not stop the shutdown."""
        return await _in_thread(
            functools.partial(self.shutdown, timeout), "ashutdown()", _report_orphan(self)
        )

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
        return await _in_thread(
            functools.partial(
                self.track_sync, event, properties, user_id=user_id, group_id=group_id, timeout=timeout
            ),
            "atrack_sync()",
            _report_orphan(self),
        )

    async def aidentify_sync(
        self: _BlockingClient,
        user_id: Id,
        traits: Any = None,
        *,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Awaitable :meth:`~klime.Client.identify_sync`; see :meth:`atrack_sync`."""
        return await _in_thread(
            functools.partial(self.identify_sync, user_id, traits, timeout=timeout),
            "aidentify_sync()",
            _report_orphan(self),
        )

    async def agroup_sync(
        self: _BlockingClient,
        group_id: Id,
        traits: Any = None,
        *,
        user_id: Optional[Id] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Awaitable :meth:`~klime.Client.group_sync`; see :meth:`atrack_sync`."""
        return await _in_thread(
            functools.partial(self.group_sync, group_id, traits, user_id=user_id, timeout=timeout),
            "agroup_sync()",
            _report_orphan(self),
        )


# ---------------------------------------------------------------------------------------------
# ASGI lifespan
# ---------------------------------------------------------------------------------------------

_STARTUP_ANSWERS = ("lifespan.startup.complete", "lifespan.startup.failed")
_SHUTDOWN_ANSWERS = ("lifespan.shutdown.complete", "lifespan.shutdown.failed")


class _KlimeLifespan:
    """The ASGI app returned by :func:`asgi_lifespan`."""

    def __init__(self, app: ASGIApp, client: Any, timeout: Optional[float], shutdown: bool) -> None:
        self.app = app
        self.client = client
        self.timeout = timeout
        self.shutdown = shutdown

    def __repr__(self) -> str:
        return f"<klime asgi_lifespan of {self.app!r}>"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "lifespan":
            await self.app(scope, receive, send)
            return
        await _Lifespan(self).run(scope, receive, send)

    def _target(self) -> Any:
        if self.client is not None:
            return self.client
        import klime

        return klime.client  # the default client, if one was ever made; none: nothing to flush

    async def flush(self) -> None:
        """Flush (or shut down) the client off the loop. Never raises."""
        import asyncio

        client = self._target()
        if client is None:
            return
        timeout = self.timeout if self.timeout is not None else getattr(client, "exit_timeout", None)
        what = "shutdown" if self.shutdown else "flush"
        call = client.shutdown if self.shutdown else client.flush
        try:
            result = await _in_thread(
                functools.partial(call, timeout), f"ASGI lifespan {what}", _report_orphan(client)
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("klime: the ASGI lifespan %s failed", what)
            return
        if isinstance(result, FlushResult) and result.unsent:
            log.warning(
                "klime: %d events still unsent after the ASGI lifespan %s (timeout %ss)",
                result.unsent,
                what,
                timeout,
            )
        else:
            log.debug("klime: ASGI lifespan %s done: %r", what, result)


class _Lifespan:
    """One run of the lifespan protocol between the server, klime and the wrapped app."""

    def __init__(self, owner: _KlimeLifespan) -> None:
        self.owner = owner
        self.startup_received = False
        self.startup_answered = False
        self.shutdown_received = False
        self.flushed = False

    async def flush_once(self) -> None:
        if not self.flushed:
            self.flushed = True
            await self.owner.flush()

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def app_receive() -> Message:
            message = await receive()
            kind = message.get("type")
            if kind == "lifespan.startup":
                self.startup_received = True
            elif kind == "lifespan.shutdown":
                self.shutdown_received = True
            return message

        async def app_send(message: Message) -> None:
            kind = message.get("type")
            if kind in _STARTUP_ANSWERS:
                self.startup_answered = True
            elif kind in _SHUTDOWN_ANSWERS:
                # The app's own shutdown handlers have run (and may have tracked events).
                await self.flush_once()
            await send(message)

        try:
            await self.owner.app(scope, app_receive, app_send)
        except Exception as exc:
            if self.startup_answered or self.startup_received:
                # A real failure of the app's lifespan handling: the server decides.
                if self.shutdown_received:
                    await self.flush_once()
                raise
            log.debug(
                "klime: the wrapped app does not handle ASGI lifespan (%s); klime answers it",
                type(exc).__name__,
            )
        if self.startup_answered:
            if self.shutdown_received:
                await self.flush_once()  # the app returned without answering the shutdown
            return
        await self._serve(receive, send)

    async def _serve(self, receive: Receive, send: Send) -> None:
        """Speak the lifespan protocol for an app that does not."""
        if not self.startup_received:
            message = await receive()
            if message.get("type") != "lifespan.startup":
                return
        await send({"type": "lifespan.startup.complete"})
        while True:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                await self.flush_once()
                await send({"type": "lifespan.shutdown.complete"})
                return


def asgi_lifespan(
    app: ASGIApp,
    client: Any = None,
    *,
    timeout: Optional[float] = None,
    shutdown: bool = False,
) -> ASGIApp:
    """Wrap an ASGI app so that the server's lifespan shutdown flushes klime.

    When the server (uvicorn, hypercorn, daphne...) shuts the app down, the wrapper lets the
    app's own shutdown handlers run first, then flushes ``client`` (default: the default
    client ``klime.client``, if one exists by then) in a worker thread, without blocking
    the loop, for at most ``timeout`` seconds (default: the client's ``exit_timeout``).
    With ``shutdown=True`` the client is shut down instead of flushed (only for a client
    that lives exactly as long as this app). HTTP and websocket traffic pass through
    untouched. Apps that do not handle the lifespan protocol themselves (they raise on the
    ``lifespan`` scope, as Django's ASGI handler does, or return) get it answered for them.
    A failing flush is logged and never fails the server's shutdown.

    Usage: ``app = klime.asgi_lifespan(app)`` (or ``asgi_lifespan(app, client)``).
    """
    if not callable(app):
        raise TypeError(f"asgi_lifespan() needs an ASGI app, not {type(app).__name__}")
    return _KlimeLifespan(app, client, timeout, shutdown)
