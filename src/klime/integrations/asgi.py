"""ASGI: flush klime's events after each response, and at the server's lifespan shutdown.

::

    from klime.integrations.asgi import KlimeASGIMiddleware
    app = KlimeASGIMiddleware(app, flush=True)   # after every HTTP response

    app = klime.asgi_lifespan(app)                # at the server's shutdown, off the loop

:class:`KlimeASGIMiddleware` flushes in the event loop's default executor once the
application has finished the request (its response sent), so the event loop never blocks on
it; on ``lifespan.shutdown`` every client's queued events are flushed before the application
hears of the shutdown.

:func:`asgi_lifespan` (also ``klime.asgi_lifespan``, imported from here on first use) wraps
an ASGI application so that the server's lifespan shutdown flushes the client after the
app's own shutdown handlers, without blocking the loop, also for apps that do not speak the
lifespan protocol themselves (Django's ASGI handler, plain callables).

An integration (top layer). May import: the face (the default client, the asyncio helpers of
:mod:`klime._aio`), :mod:`.wsgi`'s per-request flush, the model and the standard library;
asyncio only when a coroutine runs.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, MutableMapping, Optional

from .. import _default
from .._aio import run_off_loop
from .._logging import log
from .._models import FlushResult
from .wsgi import FLUSH_TIMEOUT, FlushingMiddleware

__all__ = ["ASGIApp", "FLUSH_TIMEOUT", "KlimeASGIMiddleware", "asgi_lifespan"]

#: ASGI types (the ASGI 3 single-callable form).
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class KlimeASGIMiddleware(FlushingMiddleware[ASGIApp]):
    """Wrap an ASGI application; flush klime after each HTTP request and at shutdown.

    Args:
        app: the ASGI application.
        client: the client to flush; None flushes every live klime client of the process
            that has queued events.
        flush: True flushes after every HTTP request, False never; None (default) only
            where klime cannot run its background thread.
        timeout: seconds one flush may take (None: until sent or retries run out).

    The flush never blocks the event loop (it runs in the loop's executor).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if kind != "http" or not self.flushing():
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await self._flush()

    async def _flush(self) -> None:
        """:meth:`flush_now` in the loop's default executor: the loop never blocks on it."""
        import asyncio

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.flush_now)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        """``receive``, flushing before the app hears of ``lifespan.shutdown``."""

        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                await self._flush()
            return message

        return wrapped


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

    def _client_to_flush(self) -> Any:
        """The client given, else the default client if one exists (None: nothing to flush)."""
        if self.client is not None:
            return self.client
        return _default.current()  # the default client, if one was ever made; none: nothing to flush

    async def flush(self) -> None:
        """Flush (or shut down) the client in a worker thread: the loop never blocks on it.
        Never raises (but lets a cancellation through)."""
        import asyncio

        client = self._client_to_flush()
        if client is None:
            return
        timeout = self.timeout if self.timeout is not None else getattr(client, "exit_timeout", None)
        what = "shutdown" if self.shutdown else "flush"
        call = client.shutdown if self.shutdown else client.flush
        try:
            result = await run_off_loop(client, f"ASGI lifespan {what}", functools.partial(call, timeout))
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
        """Flush at most once per lifespan run."""
        if not self.flushed:
            self.flushed = True
            await self.owner.flush()

    async def run(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the wrapped app's lifespan, flushing after its shutdown (or answer for it)."""

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
