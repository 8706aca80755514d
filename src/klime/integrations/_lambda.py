"""``@klime_lambda``: the AWS Lambda decorator, in both of its modes.

- Default: the handler's events are sent before it returns (or raises), within the time
  the Lambda context says the invocation has left (the wrappers of :mod:`._serverless`).
- ``after_response=True``: the wrapper hands the invocation to klime's Lambda internal
  extension (``klime/integrations/lambda/_extension.py``), whose thread flushes it after
  the runtime has posted the response and before Lambda may freeze the sandbox; when that
  is impossible the wrapper flushes as in the default mode.

Under SnapStart it also registers a before-snapshot flush (:func:`_prepare_snapstart`).

The public home of these names is ``klime.integrations.lambda`` (re-exported from
``klime`` and ``klime.integrations``); they are defined here because ``lambda`` is a
keyword, so type checkers can only follow an import of this module. The modules of that
package are reached through ``importlib`` for the same reason, and only when needed (a
plain handler's cold start imports neither the extension nor ``http.client``).

May import: the standard library, :mod:`._serverless` and klime's layers below the
integrations; the ``lambda`` package only through :func:`_lambda_module`.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import os
import sys
import threading
import types
from typing import TYPE_CHECKING, Any, Callable, Coroutine, Dict, Optional, Protocol, Tuple, TypeVar, overload

from .. import _lifecycle
from .._logging import log
from ._serverless import (
    DEFAULT_DEADLINE_MARGIN_S,
    DEFAULT_FLUSH_TIMEOUT,
    Invocation,
    Options,
    Remaining,
    begin_invocation,
    clients_to_flush,
    refuse_running_loop,
    require_function,
    run_here,
    wrap,
)

if TYPE_CHECKING:
    from typing_extensions import ParamSpec

    from .._client import Client

    P = ParamSpec("P")

R = TypeVar("R")

__all__ = ["AfterResponse", "LambdaDecorator", "klime_lambda"]


class LambdaDecorator(Protocol):
    """What ``klime_lambda(client=..., ...)`` returns."""

    @overload
    def __call__(self, handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]: ...

    @overload
    def __call__(self, handler: Callable[P, R]) -> Callable[P, R]: ...


def _lambda_module(name: str) -> Any:
    """``klime.integrations.lambda.<name>`` (``lambda`` is a keyword: reached through importlib)."""
    return importlib.import_module("klime.integrations.lambda." + name)


# ---------------------------------------------------------------------- the Lambda context


def _lambda_context(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
    """The Lambda context: the handler's second argument, or ``context=``."""
    context = kwargs.get("context")
    if context is None and len(args) >= 2:
        context = args[1]
    return context


def _remaining_seconds(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    """Seconds the invocation has left, from the Lambda context (the handler's second
    argument, or ``context=``); None without one. Non-blocking; may raise (the caller logs)."""
    method = getattr(_lambda_context(args, kwargs), "get_remaining_time_in_millis", None)
    if not callable(method):
        return None
    millis = method()
    return max(0.0, float(millis) / 1000.0)


def _request_id(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
    """The invocation's ``aws_request_id`` from the Lambda context, or None. Never raises."""
    try:
        request_id = getattr(_lambda_context(args, kwargs), "aws_request_id", None)
    except Exception:
        return None
    return request_id if isinstance(request_id, str) and request_id else None


# ---------------------------------------------------------------------- after the response


class AfterResponse(Protocol):
    """What the after-response wrapper needs of klime's Lambda extension
    (``klime.integrations.lambda._extension.LambdaExtension``): ``begin`` and ``end``
    never block nor raise; both are thread-safe."""

    def begin(self, wrapper: Callable[..., Any], request_id: Optional[str]) -> bool:
        """True: the extension flushes this invocation after the response."""
        ...

    def end(
        self,
        request_id: str,
        invocation: Invocation,
        wrapper_frame: Optional[types.FrameType],
        wrapper: Callable[..., Any],
    ) -> bool:
        """True: the invocation is handed over; the wrapper must not flush it."""
        ...


#: Set (True) on every after-response wrapper; the extension's ``AFTER_RESPONSE_MARK``.
_AFTER_RESPONSE_MARK = "_klime_after_response"

#: True while an after-response wrapper serves the current invocation in this context: a
#: decorated function called inside it leaves its events to that wrapper's hand-over.
_serving: contextvars.ContextVar[bool] = contextvars.ContextVar("klime_after_response", default=False)


def _wrap_after_response(
    handler: Callable[..., Any], options: Options, remaining: Remaining, extension: Optional[AfterResponse]
) -> Callable[..., Any]:
    """A Lambda wrapper that, when ``extension`` takes the invocation, returns without
    flushing: klime's extension thread flushes after the runtime has posted the response.
    Otherwise (no extension, not the function Lambda calls, not a real invocation, too
    late for its round) it flushes before returning, as the default wrapper does."""
    require_function(handler, options)
    is_async = inspect.iscoroutinefunction(handler)

    def call(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
        """The handler itself (a coroutine run to completion here). Blocks."""
        if is_async:
            return run_here(handler, args, kwargs)
        return handler(*args, **kwargs)

    @functools.wraps(handler)
    def klime_wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_async:
            refuse_running_loop(options)
        if _serving.get():  # inside a decorated invocation: its hand-over covers these events
            inner = begin_invocation(options, remaining, args, kwargs)
            try:
                return call(args, kwargs)
            finally:
                inner.close()
        request_id = _request_id(args, kwargs)
        serving = extension is not None and extension.begin(klime_wrapper, request_id)
        invocation = begin_invocation(options, remaining, args, kwargs)
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

    setattr(klime_wrapper, _AFTER_RESPONSE_MARK, True)  # how the extension knows the one Lambda calls
    return klime_wrapper


def _after_response_extension(options: Options) -> Optional[AfterResponse]:
    """klime's extension (registered now, during Init) or None (one warning says why)."""
    try:
        found: Optional[AfterResponse] = _lambda_module("_extension").extension(
            margin=options.deadline_margin
        )
        return found
    except Exception:
        log.exception(
            "klime: could not set up the Lambda extension; events are sent before the handler returns"
        )
        return None


#: Longest the before-snapshot flush of SnapStart may take, seconds.
SNAPSHOT_FLUSH_TIMEOUT_S = 5.0

_snapshot_lock = threading.Lock()
_snapshot_hook_installed = False


def _flush_before_snapshot() -> None:
    """Send the events recorded during Init before Lambda takes the snapshot: else every
    sandbox restored from it would send them again (with the same messageId). Blocks up to
    :data:`SNAPSHOT_FLUSH_TIMEOUT_S`; never raises."""
    totals = _lifecycle.flush_quietly(
        clients_to_flush(None),
        SNAPSHOT_FLUSH_TIMEOUT_S,
        after="Init, before the SnapStart snapshot",
        unsent_warning_key=None,  # the warning below says what it means here
    )
    if totals.unsent:
        log.warning(
            "klime: %d events recorded during Init could not be sent before the SnapStart "
            "snapshot; every sandbox restored from it will send them (with the same messageId)",
            totals.unsent,
        )
    log.debug("klime: %d events sent before the snapshot", totals.sent)


def _prepare_snapstart() -> None:
    """Under SnapStart, register (once per process) :func:`_flush_before_snapshot` with
    Lambda's ``snapshot_restore_py``. Thread-safe; non-blocking; never raises."""
    global _snapshot_hook_installed
    if os.environ.get("AWS_LAMBDA_INITIALIZATION_TYPE") != "snap-start":
        return
    with _snapshot_lock:
        if _snapshot_hook_installed:
            return
        try:
            import snapshot_restore_py  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError:
            log.warning_once(
                "snapstart-no-hooks",
                "klime: SnapStart is on but snapshot_restore_py is missing: events recorded during "
                "Init may be sent again by every sandbox restored from the snapshot",
            )
            return
        try:
            snapshot_restore_py.register_before_snapshot(_flush_before_snapshot)
            _snapshot_hook_installed = True
        except Exception:
            log.exception("klime: could not register the SnapStart before-snapshot flush")


# ---------------------------------------------------------------------- the decorator


@overload
def klime_lambda(handler: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, R]: ...


@overload
def klime_lambda(handler: Callable[P, R]) -> Callable[P, R]: ...


@overload
def klime_lambda(
    handler: None = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT,
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S,
    after_response: bool = False,
) -> LambdaDecorator: ...


def klime_lambda(
    handler: Optional[Callable[..., Any]] = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT,
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
        """Wrap ``fn``; in after-response mode, register the extension (blocks briefly)."""
        _prepare_snapstart()
        if not options.after_response:
            return wrap(fn, options, _remaining_seconds, async_to_sync=True)
        extension = _after_response_extension(options)
        return _wrap_after_response(fn, options, _remaining_seconds, extension)

    if handler is None:
        return decorate
    return decorate(handler)
