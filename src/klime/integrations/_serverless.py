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

``@klime_lambda(after_response=True)`` replaces step 2: the wrapper hands the invocation
to klime's Lambda internal extension (``klime/integrations/lambda/_extension.py``), whose
thread flushes it after the runtime has posted the response and before Lambda may freeze
the sandbox; when that is impossible the wrapper flushes as above.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import math
import numbers
import os
import sys
import threading
import time
import types
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
    "AfterResponse",
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

    __slots__ = ("after_response", "client", "deadline_margin", "flush_timeout", "what")

    def __init__(
        self, what: str, client: Any, flush_timeout: Any, deadline_margin: Any, after_response: Any = False
    ) -> None:
        from .._client import Client

        if client is not None and not isinstance(client, Client):
            raise ConfigurationError(f"{what}: client must be a klime.Client, not {type(client).__name__}")
        if not isinstance(after_response, bool):
            raise ConfigurationError(f"{what}: after_response must be True or False")
        self.what = what
        self.client: Optional[Client] = client
        self.flush_timeout = None if flush_timeout is None else _seconds(what, "flush_timeout", flush_timeout)
        self.deadline_margin = _seconds(what, "deadline_margin", deadline_margin)
        self.after_response = after_response


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


def _lambda_context(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """The Lambda context: the handler's second argument, or ``context=``."""
    context = kwargs.get("context")
    if context is None and len(args) >= 2:
        context = args[1]
    return context


def _remaining_seconds(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    """From the Lambda context (the handler's second argument, or ``context=``)."""
    method = getattr(_lambda_context(args, kwargs), "get_remaining_time_in_millis", None)
    if not callable(method):
        return None
    millis = method()
    return max(0.0, float(millis) / 1000.0)


def _request_id(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    try:
        request_id = getattr(_lambda_context(args, kwargs), "aws_request_id", None)
    except Exception:
        return None
    return request_id if isinstance(request_id, str) and request_id else None


# ---------------------------------------------------------------------- after the response


class AfterResponse(Protocol):
    """What the after-response wrapper needs of klime's Lambda extension
    (``klime.integrations.lambda._extension.LambdaExtension``)."""

    def begin(self, wrapper: Callable[..., Any], request_id: Optional[str]) -> bool: ...

    def end(
        self,
        request_id: str,
        invocation: Invocation,
        wrapper_frame: Optional[types.FrameType],
        wrapper: Callable[..., Any],
    ) -> bool: ...


def _extension_module() -> Any:
    # ``lambda`` is a keyword: the module is reached through importlib.
    return importlib.import_module("klime.integrations.lambda._extension")


#: True while an after-response wrapper serves the current invocation in this context: a
#: decorated function called inside it leaves its events to that wrapper's hand-over.
_serving: contextvars.ContextVar[bool] = contextvars.ContextVar("klime_after_response", default=False)


def _wrap_after_response(
    handler: Callable[..., Any], options: Options, remaining: Remaining, extension: Optional[AfterResponse]
) -> Callable[..., Any]:
    """A Lambda wrapper that, when ``extension`` takes the invocation, returns without
    flushing: klime's extension thread flushes after the runtime has posted the response.
    Otherwise (no extension, not the function Lambda calls, not a real invocation, too
    late for its round) it flushes before returning, as :func:`_wrap_sync` does."""
    if not callable(handler):
        raise ConfigurationError(f"{options.what} decorates a function, not {type(handler).__name__}")
    is_async = inspect.iscoroutinefunction(handler)

    def call(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        if is_async:
            import asyncio

            loop = _thread_loop()
            asyncio.set_event_loop(loop)
            return loop.run_until_complete(handler(*args, **kwargs))
        return handler(*args, **kwargs)

    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_async:
            _refuse_running_loop(options)
        if _serving.get():  # inside a decorated invocation: its hand-over covers these events
            inner = Invocation(options).begin(_remaining(remaining, args, kwargs))
            try:
                return call(args, kwargs)
            finally:
                inner.close()
        request_id = _request_id(args, kwargs)
        serving = extension is not None and extension.begin(klime_wrapper, request_id)
        invocation = Invocation(options).begin(_remaining(remaining, args, kwargs))
        token = _serving.set(True) if serving else None
        try:
            return call(args, kwargs)
        finally:
            if token is not None:
                try:
                    _serving.reset(token)
                except ValueError:
                    _serving.set(False)
            handed = (
                extension is not None
                and serving
                and request_id is not None
                and extension.end(request_id, invocation, sys._getframe(), klime_wrapper)
            )
            if not handed:
                invocation.flush()
            invocation.close()

    return klime_wrapper


def _refuse_running_loop(options: Options) -> None:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise ConfigurationError(
        f"{options.what} turned this async handler into a plain function for the "
        "runtime; it cannot be called from a running event loop"
    )


def _after_response_extension(options: Options) -> Optional[AfterResponse]:
    """klime's extension (registered now, during Init) or None (one warning says why)."""
    try:
        found: Optional[AfterResponse] = _extension_module().extension(margin=options.deadline_margin)
        return found
    except Exception:
        log.exception(
            "klime: could not set up the Lambda extension; events are sent before the handler returns"
        )
        return None


def _flush_everything(timeout: Optional[float]) -> Tuple[int, int]:
    """Flush the default client and every live client within ``timeout`` seconds; returns
    (sent, still unsent). Blocks; never raises for one client's failure."""
    deadline = Deadline.after(timeout)
    sent = unsent = 0
    for client in _clients(Options("@klime_lambda", None, None, 0.0)):
        try:
            result = client.flush(deadline.remaining())
        except Exception:
            log.exception("klime: flushing %r failed", client)
            continue
        sent += result.sent
        unsent += result.unsent
    return sent, unsent


def _prepare_snapstart() -> None:
    if os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") != "snap-start":
        return
    try:
        _extension_module().install_snapshot_flush(_flush_everything)
    except Exception:
        log.exception("klime: could not register the SnapStart before-snapshot flush")


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
    after_response: bool = False,
) -> LambdaDecorator: ...


def klime_lambda(
    handler: Optional[Callable[..., Any]] = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT_S,
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S,
    after_response: bool = False,
) -> Any:
    """Decorate an AWS Lambda handler ``handler(event, context)`` so that the events it
    records are sent before it returns — and before it raises — or, with
    ``after_response=True``, right after the runtime has posted its result.

    Use it bare (``@klime_lambda``) or with options (``@klime_lambda(client=c)``):

    - ``client``: the client to flush. By default the default client (``klime.client``,
      created from ``KLIME_WRITE_KEY`` when unset) and every other client of the process.
      Create clients at module level: they, and their connections, are reused across warm
      invocations.
    - ``flush_timeout``: seconds the flush may take at most (default 2; None: no limit
      but the invocation's own).
    - ``deadline_margin``: seconds kept back from ``context.get_remaining_time_in_millis()``
      for the runtime to post the result (default 0.25).
    - ``after_response``: register klime as a Lambda internal extension (now: decorate at
      import time, during Init) so that the invoker gets the result first and klime sends
      in the window Lambda grants before it freezes the sandbox (billed as post-runtime
      duration, bounded by ``flush_timeout`` and the deadline minus ``deadline_margin``).
      Where that is impossible (not on Lambda, decorated after Init, the Extensions API
      refused, the function Lambda calls is another one) it flushes before returning, and
      one warning says why.

    The flush ends by ``min(flush_timeout, remaining time - deadline_margin)``; events not
    sent by then stay queued (``stats()["queued"]``) and go with the next invocation.
    The handler's return value and exception pass through unchanged; a klime failure is
    logged, never raised. An ``async def`` handler becomes a plain function (Lambda calls
    handlers synchronously) that runs the coroutine on an event loop kept across warm
    invocations. The wrapper blocks while it flushes (in after-response mode it does not
    flush); it is thread-safe. Under SnapStart events recorded during Init are sent before
    the snapshot, so that restored sandboxes do not send them again.
    """
    options = Options("@klime_lambda", client, flush_timeout, deadline_margin, after_response)

    def decorate(fn: Callable[..., Any]) -> Any:
        _prepare_snapstart()
        if not options.after_response:
            return wrap(fn, options, _remaining_seconds, async_to_sync=True)
        extension = _after_response_extension(options)
        wrapper = _wrap_after_response(fn, options, _remaining_seconds, extension)
        try:
            _extension_module().remember_wrapper(wrapper)
        except Exception:
            log.exception("klime: could not note the after-response wrapper")
        return wrapper

    if handler is None:
        return decorate
    return decorate(handler)
