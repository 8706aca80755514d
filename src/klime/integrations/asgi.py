"""ASGI: flush klime's events after each response, and at the server's shutdown::

    from klime.integrations.asgi import KlimeASGIMiddleware
    app = KlimeASGIMiddleware(app, flush=True)   # after every HTTP response

The flush runs in the event loop's default executor once the application has finished the
request (its response sent), so the event loop never blocks on it. On ``lifespan.shutdown``
every client's queued events are flushed before the application hears of the shutdown.
Imports only the standard library and klime.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, MutableMapping, Optional

from .wsgi import FLUSH_TIMEOUT, flush_now, should_flush

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["KlimeASGIMiddleware", "FLUSH_TIMEOUT"]

Scope = MutableMapping[str, Any]
Message = Dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class KlimeASGIMiddleware:
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

    def __init__(
        self,
        app: ASGIApp,
        *,
        client: Optional[Client] = None,
        flush: Optional[bool] = None,
        timeout: Optional[float] = FLUSH_TIMEOUT,
    ) -> None:
        self.app = app
        self.client = client
        self.flush = flush
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if kind != "http" or not should_flush(self.flush):
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            await self._flush()

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, flush_now, self.client, self.timeout)

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                await self._flush()
            return message

        return wrapped
