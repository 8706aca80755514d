"""Wrap a serverless handler around an :class:`~._serverless.Invocation`, whatever kind of
function it is: plain, ``async def`` kept a coroutine function, or ``async def`` turned
into a plain function for a runtime that calls handlers synchronously (AWS Lambda), which
runs the coroutine on an event loop kept per thread across warm invocations.

``asyncio`` is imported only when an ``async def`` handler is decorated, so a plain
handler's cold start does not pay for it.

May import: the standard library, :mod:`._serverless` and klime's layers below the
integrations; no other integration.
"""

from __future__ import annotations

import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, Optional, Tuple

from .._logging import log
from ..errors import ConfigurationError
from ._serverless import Invocation, Options, Remaining

if TYPE_CHECKING:
    import asyncio

__all__ = ["refuse_running_loop", "remaining_or_none", "require_function", "run_here", "wrap"]


def require_function(handler: Any, options: Options) -> None:
    """Raise ConfigurationError unless ``handler`` can be called (at decoration time)."""
    if not callable(handler):
        raise ConfigurationError(f"{options.what} decorates a function, not {type(handler).__name__}")


def remaining_or_none(remaining: Remaining, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    """``remaining(args, kwargs)``, or None (logged) when reading it fails. Never raises."""
    try:
        return remaining(args, kwargs)
    except Exception:
        log.exception("klime: could not read the time the invocation has left")
        return None


def wrap(handler: Callable[..., Any], options: Options, remaining: Remaining, *, async_to_sync: bool) -> Any:
    """Wrap ``handler`` so that every call flushes before its outcome goes out.

    A coroutine function stays one (its flush runs in the loop's default executor, so the
    loop is never blocked), unless ``async_to_sync``: then the wrapper is a plain function
    that runs the coroutine to completion on an event loop kept per thread across calls
    (AWS Lambda calls handlers synchronously).
    """
    require_function(handler, options)
    if inspect.iscoroutinefunction(handler):
        if async_to_sync:
            return _wrap_async_as_sync(handler, options, remaining)
        return _wrap_async(handler, options, remaining)
    return _wrap_sync(handler, options, remaining)


def _wrap_sync(handler: Callable[..., Any], options: Options, remaining: Remaining) -> Callable[..., Any]:
    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        invocation = Invocation(options).begin(remaining_or_none(remaining, args, kwargs))
        try:
            return handler(*args, **kwargs)
        finally:
            invocation.flush()
            invocation.close()

    return klime_wrapper


def _wrap_async(
    handler: Callable[..., Coroutine[Any, Any, Any]], options: Options, remaining: Remaining
) -> Callable[..., Coroutine[Any, Any, Any]]:
    import asyncio  # here, not at import: a sync handler's cold start need not pay for it

    @functools.wraps(handler)
    async def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        invocation = Invocation(options).begin(remaining_or_none(remaining, args, kwargs))
        try:
            return await handler(*args, **kwargs)
        finally:
            try:
                await asyncio.get_running_loop().run_in_executor(None, invocation.flush)
            finally:
                invocation.close()

    return klime_wrapper


def _wrap_async_as_sync(
    handler: Callable[..., Coroutine[Any, Any, Any]], options: Options, remaining: Remaining
) -> Callable[..., Any]:
    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        refuse_running_loop(options)
        invocation = Invocation(options).begin(remaining_or_none(remaining, args, kwargs))
        try:
            return run_here(handler, args, kwargs)
        finally:
            invocation.flush()
            invocation.close()

    return klime_wrapper


# ---------------------------------------------------------------------- async as sync

_loops = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    import asyncio

    loop: Optional[asyncio.AbstractEventLoop] = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _loops.loop = loop
    return loop


def refuse_running_loop(options: Options) -> None:
    """Raise ConfigurationError if this thread runs an event loop: an ``async def`` handler
    turned into a plain function cannot run its coroutine to completion there."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigurationError(
        f"{options.what} turned this async handler into a plain function for the "
        "runtime; it cannot be called from a running event loop"
    )


def run_here(
    handler: Callable[..., Coroutine[Any, Any, Any]], args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Any:
    """Run ``handler(*args, **kwargs)`` to completion on this thread's event loop (made on
    first use, kept across calls). Blocks; the handler's result or exception passes through."""
    import asyncio

    loop = _thread_loop()
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(handler(*args, **kwargs))
