"""What ``@klime_lambda`` and ``@klime_cloud_function`` share: find the clients, bound the
flush by the time the invocation has left, flush before the handler's outcome goes out, and
never let klime change that outcome.

One :class:`Invocation` per call of a decorated handler:

1. :meth:`Invocation.begin` (before the handler): works out the invocation's deadline
   (``remaining`` seconds from now, minus ``deadline_margin``), tells each client's
   transport that a decorator will flush (``begin_invocation``), and makes the deadline the
   current one for inline sends made while the handler runs.
2. :meth:`Invocation.flush` (after the handler returned or raised): flushes every client
   within ``min(flush_timeout, time left)``. Events not sent by then stay queued for the
   next invocation (counted as ``queued``; one warning).
3. :meth:`Invocation.close`: restores the previous deadline (in the handler's context).

None of these raises: a klime failure is logged and the handler's result or exception goes
out unchanged. Standard library and klime only.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import numbers
import threading
import time
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Coroutine,
    Dict,
    List,
    Optional,
    Protocol,
    Tuple,
    TypeVar,
    overload,
)

from .._deadline import Deadline
from .._logging import log
from ..errors import ConfigurationError
from ..transports.invocation import enter_invocation, exit_invocation

if TYPE_CHECKING:
    import asyncio

    from typing_extensions import ParamSpec

    from .._client import Client

    P = ParamSpec("P")

R = TypeVar("R")

__all__ = [
    "DEFAULT_DEADLINE_MARGIN_S",
    "DEFAULT_FLUSH_TIMEOUT_S",
    "Invocation",
    "LambdaDecorator",
    "Options",
    "klime_lambda",
    "wrap",
]

#: Longest a decorator spends flushing, seconds (less when the invocation has less left).
DEFAULT_FLUSH_TIMEOUT_S = 2.0
#: Time kept back from the invocation's deadline for the runtime to post the result, seconds.
DEFAULT_DEADLINE_MARGIN_S = 0.25

_monotonic = time.monotonic

#: Given the handler's (args, kwargs): seconds the invocation has left, or None if unknown.
Remaining = Callable[[Tuple[Any, ...], Dict[str, Any]], Optional[float]]


class Options:
    """A decorator's options, checked once when the handler is decorated."""

    __slots__ = ("client", "deadline_margin", "flush_timeout", "what")

    def __init__(self, what: str, client: Any, flush_timeout: Any, deadline_margin: Any) -> None:
        from .._client import Client

        if client is not None and not isinstance(client, Client):
            raise ConfigurationError(f"{what}: client must be a klime.Client, not {type(client).__name__}")
        self.what = what
        self.client: Optional[Client] = client
        self.flush_timeout = None if flush_timeout is None else _seconds(what, "flush_timeout", flush_timeout)
        self.deadline_margin = _seconds(what, "deadline_margin", deadline_margin)


def _seconds(what: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{what}: {name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{what}: {name} must be a finite number >= 0, got {value!r}")
    return seconds


def _live_clients() -> List[Client]:
    """Every client of this process that was not shut down."""
    from .. import _lifecycle

    return _lifecycle.clients()


def _clients(options: Options) -> List[Client]:
    """The clients to flush: the one given, else the default client (created from the
    environment when it can be) and every other live client of this process."""
    if options.client is not None:
        return [options.client]
    import klime

    found: List[Client] = []
    try:
        found.append(klime.get_client())
    except ConfigurationError:
        pass  # no KLIME_WRITE_KEY: the handler may use clients of its own
    for client in _live_clients():
        if all(client is not other for other in found):
            found.append(client)
    return found


class Invocation:
    """One call of a decorated handler. See the module docstring. Not shared across threads."""

    __slots__ = ("_end_at", "_token", "options")

    def __init__(self, options: Options) -> None:
        self.options = options
        self._end_at: Optional[float] = None
        self._token: Optional[contextvars.Token[Optional[Deadline]]] = None

    def begin(self, remaining: Optional[float]) -> Invocation:
        """Before the handler runs. Never raises; returns self."""
        try:
            if remaining is not None:
                self._end_at = _monotonic() + remaining - self.options.deadline_margin
            for client in _clients(self.options):
                begin = getattr(client.transport, "begin_invocation", None)
                if callable(begin):
                    begin()
            self._token = enter_invocation(None if self._end_at is None else Deadline(self._end_at))
        except Exception:
            log.exception(
                "klime: %s could not prepare the invocation; the handler runs anyway", self.options.what
            )
        return self

    def flush(self) -> None:
        """After the handler: flush every client within the time left. Blocks (up to
        ``flush_timeout`` and the invocation's deadline); never raises; any thread."""
        try:
            timeout = self.options.flush_timeout
            if self._end_at is not None:
                left = max(0.0, self._end_at - _monotonic())
                timeout = left if timeout is None else min(timeout, left)
            deadline = Deadline.after(timeout)
            unsent = 0
            for client in _clients(self.options):
                try:
                    unsent += client.flush(deadline.remaining()).unsent
                except Exception:
                    log.exception("klime: flushing %r failed; the handler's outcome is unchanged", client)
            if unsent:
                log.warning_once(
                    "serverless-unsent",
                    "klime: %d events could not be sent before the invocation's deadline; they "
                    "stay queued and go out with the next invocation's flush",
                    unsent,
                )
                log.debug("klime: %d events left queued at the end of an invocation", unsent)
        except Exception:
            log.exception("klime: %s could not flush; the handler's outcome is unchanged", self.options.what)

    def close(self) -> None:
        """Restore the deadline of the enclosing context. Call in the handler's context."""
        token, self._token = self._token, None
        if token is not None:
            try:
                exit_invocation(token)
            except Exception:
                log.exception("klime: could not restore the invocation deadline")


# ---------------------------------------------------------------------- wrappers


def wrap(handler: Callable[..., Any], options: Options, remaining: Remaining, *, async_to_sync: bool) -> Any:
    """Wrap ``handler`` so that every call flushes before its outcome goes out.

    A coroutine function stays one (its flush runs in the loop's default executor, so the
    loop is never blocked), unless ``async_to_sync``: then the wrapper is a plain function
    that runs the coroutine to completion on an event loop kept per thread across calls
    (AWS Lambda calls handlers synchronously).
    """
    if not callable(handler):
        raise ConfigurationError(f"{options.what} decorates a function, not {type(handler).__name__}")
    if inspect.iscoroutinefunction(handler):
        if async_to_sync:
            return _wrap_async_as_sync(handler, options, remaining)
        return _wrap_async(handler, options, remaining)
    return _wrap_sync(handler, options, remaining)


def _remaining(remaining: Remaining, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    try:
        return remaining(args, kwargs)
    except Exception:
        log.exception("klime: could not read the time the invocation has left")
        return None


def _wrap_sync(handler: Callable[..., Any], options: Options, remaining: Remaining) -> Callable[..., Any]:
    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        invocation = Invocation(options).begin(_remaining(remaining, args, kwargs))
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
        invocation = Invocation(options).begin(_remaining(remaining, args, kwargs))
        try:
            return await handler(*args, **kwargs)
        finally:
            try:
                await asyncio.get_running_loop().run_in_executor(None, invocation.flush)
            finally:
                invocation.close()

    return klime_wrapper


_loops = threading.local()


def _thread_loop() -> asyncio.AbstractEventLoop:
    import asyncio

    loop: Optional[asyncio.AbstractEventLoop] = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _loops.loop = loop
    return loop


def _wrap_async_as_sync(
    handler: Callable[..., Coroutine[Any, Any, Any]], options: Options, remaining: Remaining
) -> Callable[..., Any]:
    import asyncio

    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise ConfigurationError(
                f"{options.what} turned this async handler into a plain function for the "
                "runtime; it cannot be called from a running event loop"
            )
        invocation = Invocation(options).begin(_remaining(remaining, args, kwargs))
        try:
            loop = _thread_loop()
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(handler(*args, **kwargs))
        finally:
            invocation.flush()
            invocation.close()

    return klime_wrapper


# ---------------------------------------------------------------------- AWS Lambda
# (public home: klime.integrations.lambda; defined here because "lambda" is a keyword, so
# type checkers can only follow an import of this module)


class LambdaDecorator(Protocol):
    """What ``klime_lambda(client=..., ...)`` returns."""

    @overload
    def __call__(self, handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]: ...

    @overload
    def __call__(self, handler: Callable[P, R]) -> Callable[P, R]: ...


def _remaining_seconds(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    """From the Lambda context (the handler's second argument, or ``context=``)."""
    context = kwargs.get("context")
    if context is None and len(args) >= 2:
        context = args[1]
    method = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(method):
        return None
    millis = method()
    return max(0.0, float(millis) / 1000.0)


@overload
def klime_lambda(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]: ...


@overload
def klime_lambda(handler: Callable[P, R]) -> Callable[P, R]: ...


@overload
def klime_lambda(
    handler: None = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT_S,
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S,
) -> LambdaDecorator: ...


def klime_lambda(
    handler: Optional[Callable[..., Any]] = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT_S,
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S,
) -> Any:
    """Decorate an AWS Lambda handler ``handler(event, context)`` so that the events it
    records are sent before it returns — and before it raises.

    Use it bare (``@klime_lambda``) or with options (``@klime_lambda(client=c)``):

    - ``client``: the client to flush. By default the default client (``klime.client``,
      created from ``KLIME_WRITE_KEY`` when unset) and every other client of the process.
      Create clients at module level: they, and their connections, are reused across warm
      invocations.
    - ``flush_timeout``: seconds the flush may take at most (default 2; None: no limit
      but the invocation's own).
    - ``deadline_margin``: seconds kept back from ``context.get_remaining_time_in_millis()``
      for the runtime to post the result (default 0.25).

    The flush ends by ``min(flush_timeout, remaining time - deadline_margin)``; events not
    sent by then stay queued (``stats()["queued"]``) and go with the next invocation.
    The handler's return value and exception pass through unchanged; a klime failure is
    logged, never raised. An ``async def`` handler becomes a plain function (Lambda calls
    handlers synchronously) that runs the coroutine on an event loop kept across warm
    invocations. The wrapper blocks while it flushes; it is thread-safe.
    """
    options = Options("@klime_lambda", client, flush_timeout, deadline_margin)

    def decorate(fn: Callable[..., Any]) -> Any:
        return wrap(fn, options, _remaining_seconds, async_to_sync=True)

    if handler is None:
        return decorate
    return decorate(handler)
