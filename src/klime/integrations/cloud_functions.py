"""Google Cloud Functions / Cloud Run functions: ``@klime_cloud_function``.

Works with functions-framework's HTTP functions (``fn(request)``) and CloudEvent functions
(``fn(cloud_event)``), plain or ``async def`` (``functions_framework.aio``)::

    import functions_framework
    import klime
    from klime import klime_cloud_function

    @functions_framework.http
    @klime_cloud_function
    def hello(request):
        klime.track("Hello Called", user_id=request.args.get("user", "anonymous"))
        return "hi"

The shared plumbing (options, one invocation's flush, the wrappers of plain and
``async def`` handlers) is :mod:`._serverless`.

May import: the standard library, :mod:`._serverless` and klime's layers below the
integrations; never the ``klime`` package.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, TypeVar, overload

from ._serverless import DEFAULT_DEADLINE_MARGIN_S, DEFAULT_FLUSH_TIMEOUT, Options, wrap

if TYPE_CHECKING:
    from .._client import Client

__all__ = ["TIMEOUT_ENV", "klime_cloud_function"]

F = TypeVar("F", bound=Callable[..., Any])

#: Where the function's timeout (seconds) is read from, first found wins: the Cloud
#: Functions runtime's variable, then the one functions-framework honours on Cloud Run.
TIMEOUT_ENV = ("FUNCTION_TIMEOUT_SEC", "CLOUD_RUN_TIMEOUT_SECONDS")


def _remaining_seconds(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[float]:
    """The function's timeout, counted from now (the call starts the invocation), or None.
    Non-blocking."""
    for name in TIMEOUT_ENV:
        raw = os.environ.get(name)
        if not raw:
            continue
        try:
            seconds = float(raw)
        except ValueError:
            continue
        if seconds > 0:
            return seconds
    return None


class CloudFunctionDecorator:
    """What ``klime_cloud_function(client=..., ...)`` returns (keeps the function's type).
    Calling it decorates a function: non-blocking, thread-safe."""

    __slots__ = ("_options",)

    def __init__(self, options: Options) -> None:
        self._options = options

    def __call__(self, fn: F) -> F:
        wrapped: F = wrap(fn, self._options, _remaining_seconds, async_to_sync=False)
        return wrapped


@overload
def klime_cloud_function(fn: F) -> F: ...


@overload
def klime_cloud_function(
    fn: None = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT,
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S,
) -> CloudFunctionDecorator: ...


def klime_cloud_function(
    fn: Optional[Callable[..., Any]] = None,
    *,
    client: Optional[Client] = None,
    flush_timeout: Optional[float] = DEFAULT_FLUSH_TIMEOUT,
    deadline_margin: float = DEFAULT_DEADLINE_MARGIN_S,
) -> Any:
    """Decorate a Cloud Function so that the events it records are sent before it returns
    (or raises): the platform may throttle or freeze the instance once the response is out.

    Bare (``@klime_cloud_function``) or with the options of :func:`klime.klime_lambda`
    (``client``, ``flush_timeout``, ``deadline_margin``). The flush ends by
    ``flush_timeout`` (default 2 s) and, where ``FUNCTION_TIMEOUT_SEC`` (or
    ``CLOUD_RUN_TIMEOUT_SECONDS``) is set, by that timeout counted from the call, minus
    ``deadline_margin``; events not sent by then stay queued for the next call.

    A plain function stays plain; an ``async def`` one stays a coroutine function and
    flushes in the event loop's default executor, so other requests on the loop go on.
    Results and exceptions pass through unchanged; klime failures are logged, never
    raised. Thread-safe.
    """
    options = Options("@klime_cloud_function", client, flush_timeout, deadline_margin)
    decorator = CloudFunctionDecorator(options)
    if fn is None:
        return decorator
    return decorator(fn)
