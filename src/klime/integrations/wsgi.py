"""WSGI: flush klime's events after each response (the per-request flush of Klime's other
SDKs), for servers where klime cannot send in the background or where you want every
request's events out before the worker takes the next one::

    from klime.integrations.wsgi import KlimeMiddleware
    application = KlimeMiddleware(application)              # flush only where needed
    application = KlimeMiddleware(application, flush=True)  # after every response

The flush runs when the server closes the response (after the body was sent), so the
client does not wait for it; the worker does, up to ``timeout`` seconds.

An integration (top layer). May import: process life and runtime facts (``_lifecycle``,
``_runtime``), the model and the standard library; ``Client`` only for type checking.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Generic, Iterable, Iterator, Optional, TypeVar

from .. import _lifecycle, _runtime

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["KlimeMiddleware", "FLUSH_TIMEOUT"]

#: Seconds a flush after a response may take, by default: the one default of every
#: integration, :data:`klime._lifecycle.DEFAULT_FLUSH_TIMEOUT` (kept under this name).
FLUSH_TIMEOUT = _lifecycle.DEFAULT_FLUSH_TIMEOUT

WSGIApp = Callable[[Any, Any], Iterable[bytes]]
App = TypeVar("App")


def should_flush(flush: Optional[bool]) -> bool:
    """The per-request flush decision: ``flush`` when given; by default, only where
    klime's background thread cannot run (uWSGI without threads). Non-blocking,
    thread-safe."""
    if flush is not None:
        return flush
    return not _runtime.background_threads_allowed()


class FlushingMiddleware(Generic[App]):
    """What the WSGI and the ASGI middleware share: the wrapped app, the client to flush
    (None: every live client), whether to flush (:func:`should_flush`) and for how long.
    Its methods are thread-safe."""

    def __init__(
        self,
        app: App,
        *,
        client: Optional[Client] = None,
        flush: Optional[bool] = None,
        timeout: Optional[float] = FLUSH_TIMEOUT,
    ) -> None:
        self.app = app
        self.client = client
        self.flush = flush
        self.timeout = timeout

    def flushing(self) -> bool:
        """Whether this middleware flushes after each request (decided per request).
        Non-blocking; thread-safe."""
        return should_flush(self.flush)

    def flush_now(self) -> None:
        """Flush what is queued, up to ``timeout`` seconds. Blocks; never raises;
        thread-safe."""
        _lifecycle.flush_quietly(self.client, self.timeout, after="the response")


class KlimeMiddleware(FlushingMiddleware[WSGIApp]):
    """Wrap a WSGI application; flush klime after each response.

    Args:
        app: the WSGI application.
        client: the client to flush; None flushes every live klime client of the process
            (the default client included) that has queued events.
        flush: True flushes after every response, False never; None (default) flushes
            only where klime cannot run its background thread (uWSGI without
            ``--enable-threads``).
        timeout: seconds one flush may take (None: until sent or retries run out).

    Calling it is thread-safe; the flush blocks the worker, not the client.
    """

    def __call__(self, environ: Any, start_response: Any) -> Iterable[bytes]:
        if not self.flushing():
            return self.app(environ, start_response)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self.flush_now()  # what the request tracked before it failed
            raise
        return _FlushOnClose(result, self.flush_now)


class _FlushOnClose:
    """The application's response, with a flush after the server closes it."""

    def __init__(self, result: Iterable[bytes], after: Callable[[], None]) -> None:
        self._result = result
        self._after = after

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._result)

    def close(self) -> None:
        """Close the application's response, then flush (blocks up to the timeout)."""
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            self._after()
