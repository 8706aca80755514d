"""What ``@klime_lambda`` and ``@klime_cloud_function`` share: their options, the clients
they flush, one :class:`Invocation` per call, and the wrappers that put a handler — plain,
or ``async def`` — inside it. The flush is bounded by the time the invocation has left,
happens before the handler's outcome goes out, and never changes that outcome.

One :class:`Invocation` per call of a decorated handler:

1. :func:`begin_invocation` (before the handler): works out the invocation's deadline
   (``remaining`` seconds from now, minus ``deadline_margin``), tells each client's
   transport that a decorator will flush (``begin_invocation``), and makes the deadline the
   current one for inline sends made while the handler runs.
2. :meth:`Invocation.flush` (after the handler returned or raised): flushes every client
   with :func:`klime._lifecycle.flush_quietly` within ``min(flush_timeout, time left)``.
   Events not sent by then stay queued for the next invocation (``queued``; one warning).
3. :meth:`Invocation.close`: restores the previous deadline (in the handler's context).

None of these raises: a klime failure is logged and the handler's result or exception goes
out unchanged. :func:`wrap` makes the wrapper: a plain handler stays plain; an ``async def``
one stays a coroutine function (its flush runs in the loop's default executor) or, for a
runtime that calls handlers synchronously (AWS Lambda), becomes a plain function that runs
the coroutine on an event loop kept per thread across warm invocations. ``asyncio`` is
imported only when an ``async def`` handler is decorated (a plain handler's cold start does
not pay for it). The Lambda decorator (and its after-response mode) is :mod:`._lambda`, the
Cloud Functions one :mod:`.cloud_functions`.

May import: the standard library and klime's layers below the integrations (the default
client from ``klime._default``, never the ``klime`` package); no other integration.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import numbers
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, List, Optional, Tuple

from .. import _default, _lifecycle
from .._client import Client
from .._deadline import Deadline
from .._logging import log
from ..errors import ConfigurationError
from ..transports.invocation import enter_invocation, exit_invocation

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "DEFAULT_DEADLINE_MARGIN_S",
    "DEFAULT_FLUSH_TIMEOUT",
    "Invocation",
    "Options",
    "Remaining",
    "begin_invocation",
    "clients_to_flush",
    "refuse_running_loop",
    "require_function",
    "run_here",
    "wrap",
]

#: Longest a decorator spends flushing, seconds (less when the invocation has less left):
#: the one default of every integration.
DEFAULT_FLUSH_TIMEOUT = _lifecycle.DEFAULT_FLUSH_TIMEOUT
#: Time kept back from the invocation's deadline for the runtime to post the result, seconds.
DEFAULT_DEADLINE_MARGIN_S = 0.25

_monotonic = time.monotonic

#: Given the handler's (args, kwargs): seconds the invocation has left, or None if unknown.
Remaining = Callable[[Tuple[Any, ...], Dict[str, Any]], Optional[float]]


class Options:
    """A decorator's options, checked once when the handler is decorated (raises
    ConfigurationError). Read-only afterwards: safe to share between threads."""

    __slots__ = ("after_response", "client", "deadline_margin", "flush_timeout", "what")

    def __init__(
        self, what: str, client: Any, flush_timeout: Any, deadline_margin: Any, after_response: Any = False
    ) -> None:
        if client is not None and not isinstance(client, Client):
            raise ConfigurationError(f"{what}: client must be a klime.Client, not {type(client).__name__}")
        if not isinstance(after_response, bool):
            raise ConfigurationError(f"{what}: after_response must be True or False")
        self.what = what
        self.client: Optional[Client] = client
        self.flush_timeout = (
            None if flush_timeout is None else _checked_seconds(what, "flush_timeout", flush_timeout)
        )
        self.deadline_margin = _checked_seconds(what, "deadline_margin", deadline_margin)
        self.after_response = after_response


def _checked_seconds(what: str, name: str, value: Any) -> float:
    """``value`` as seconds (a finite number >= 0), else ConfigurationError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{what}: {name} must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ConfigurationError(f"{what}: {name} must be a finite number >= 0, got {value!r}")
    return seconds


def _live_clients() -> List[Client]:
    """Every client of this process that was not shut down."""
    return [client for client in _lifecycle.clients() if isinstance(client, Client)]


def clients_to_flush(client: Optional[Client]) -> List[Client]:
    """The clients a decorator flushes: ``client`` if given, else the default client
    (created from the environment when it can be) and every other live client of this
    process. Non-blocking; thread-safe."""
    if client is not None:
        return [client]
    found: List[Client] = []
    try:
        found.append(_default.get_or_create())
    except ConfigurationError:
        pass  # no KLIME_WRITE_KEY: the handler may use clients of its own
    for live in _live_clients():
        if all(live is not other for other in found):
            found.append(live)
    return found


class Invocation:
    """One call of a decorated handler. See the module docstring. Not shared across threads."""

    __slots__ = ("_end_at", "_token", "options")

    def __init__(self, options: Options) -> None:
        self.options = options
        self._end_at: Optional[float] = None
        self._token: Optional[contextvars.Token[Optional[Deadline]]] = None

    def begin(self, remaining: Optional[float]) -> Invocation:
        """Before the handler runs (``remaining``: seconds the invocation has left, None if
        unknown). Blocks only briefly; never raises; returns self."""
        try:
            if remaining is not None:
                self._end_at = _monotonic() + remaining - self.options.deadline_margin
            for client in clients_to_flush(self.options.client):
                client.transport.begin_invocation()
            self._token = enter_invocation(None if self._end_at is None else Deadline(self._end_at))
        except Exception:
            log.exception(
                "klime: %s could not prepare the invocation; the handler runs anyway", self.options.what
            )
        return self

    def flush(self, until: Optional[float] = None) -> None:
        """After the handler: flush every client within the time left. Blocks (up to
        ``flush_timeout`` and the invocation's deadline, and ``until``, a
        ``time.monotonic()``, when given); never raises; any thread."""
        try:
            timeout = self.options.flush_timeout
            end_at = self._end_at
            if until is not None:
                end_at = until if end_at is None else min(end_at, until)
            if end_at is not None:
                left = max(0.0, end_at - _monotonic())
                timeout = left if timeout is None else min(timeout, left)
            unsent = _lifecycle.flush_quietly(
                clients_to_flush(self.options.client),
                timeout,
                after=f"{self.options.what}'s handler",
                note="; the handler's outcome is unchanged",
                unsent_warning_key=None,  # the warning below says more: the deadline
            ).unsent
            if unsent:
                log.warning_once(
                    "serverless-unsent",
                    "klime: %d events could not be sent before the invocation's deadline; they "
                    "stay queued and go out with the next invocation's flush",
                    unsent,
                )
        except Exception:
            log.exception("klime: %s could not flush; the handler's outcome is unchanged", self.options.what)

    def close(self) -> None:
        """Restore the deadline of the enclosing context. Call in the handler's context.
        Non-blocking; never raises."""
        token, self._token = self._token, None
        if token is not None:
            try:
                exit_invocation(token)
            except Exception:
                log.exception("klime: could not restore the invocation deadline")


def begin_invocation(
    options: Options, remaining: Remaining, args: Tuple[Any, ...], kwargs: Dict[str, Any]
) -> Invocation:
    """A begun :class:`Invocation` for one call ``(args, kwargs)`` of a decorated handler;
    ``remaining`` reads the time it has left (a failure to read it is logged: no deadline).
    Blocks only briefly; never raises."""
    try:
        left = remaining(args, kwargs)
    except Exception:
        log.exception("klime: could not read the time the invocation has left")
        left = None
    return Invocation(options).begin(left)


# ---------------------------------------------------------------------- the wrappers


def require_function(handler: Any, options: Options) -> None:
    """Raise ConfigurationError unless ``handler`` can be called (at decoration time).
    Non-blocking."""
    if not callable(handler):
        raise ConfigurationError(f"{options.what} decorates a function, not {type(handler).__name__}")


def wrap(handler: Callable[..., Any], options: Options, remaining: Remaining, *, async_to_sync: bool) -> Any:
    """Wrap ``handler`` so that every call flushes before its outcome goes out.

    A coroutine function stays one (its flush runs in the loop's default executor, so the
    loop is never blocked), unless ``async_to_sync``: then the wrapper is a plain function
    that runs the coroutine to completion on this thread's event loop (AWS Lambda calls
    handlers synchronously). The wrappers block while they flush and are thread-safe;
    ``wrap`` itself raises ConfigurationError for a handler that cannot be called.
    """
    require_function(handler, options)
    is_async = inspect.iscoroutinefunction(handler)
    if is_async and not async_to_sync:
        return _wrap_async(handler, options, remaining)

    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_async:
            refuse_running_loop(options)
        invocation = begin_invocation(options, remaining, args, kwargs)
        try:
            return run_here(handler, args, kwargs) if is_async else handler(*args, **kwargs)
        finally:
            invocation.flush()
            invocation.close()

    return klime_wrapper


def _wrap_async(
    handler: Callable[..., Coroutine[Any, Any, Any]], options: Options, remaining: Remaining
) -> Callable[..., Coroutine[Any, Any, Any]]:
    """An ``async def`` wrapper: the flush runs in the loop's default executor."""
    import asyncio  # here, not at import: a plain handler's cold start need not pay for it

    @functools.wraps(handler)
    async def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        invocation = begin_invocation(options, remaining, args, kwargs)
        try:
            return await handler(*args, **kwargs)
        finally:
            try:
                await asyncio.get_running_loop().run_in_executor(None, invocation.flush)
            finally:
                invocation.close()

    return klime_wrapper


_loops = threading.local()


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
    first use, kept across calls). Blocks; the handler's result or exception passes through.
    Thread-safe: each thread has its own loop."""
    import asyncio

    loop: Optional[asyncio.AbstractEventLoop] = getattr(_loops, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _loops.loop = loop
    asyncio.set_event_loop(loop)
    return loop.run_until_complete(handler(*args, **kwargs))
