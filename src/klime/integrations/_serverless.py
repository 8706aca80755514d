"""What ``@klime_lambda`` and ``@klime_cloud_function`` share: their options, the clients
they flush, and one :class:`Invocation` — bound the flush by the time the invocation has
left, flush before the handler's outcome goes out, and never let klime change that outcome.

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
out unchanged. How a handler is wrapped around an Invocation is :mod:`._wrappers`; the
Lambda decorator (and its after-response mode) is :mod:`._lambda`, the Cloud Functions one
:mod:`.cloud_functions`.

May import: the standard library and klime's layers below the integrations (the default
client from ``klime._default``, never the ``klime`` package); no other integration.
"""

from __future__ import annotations

import contextvars
import math
import numbers
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .. import _default, _lifecycle
from .._client import Client
from .._deadline import Deadline
from .._logging import log
from ..errors import ConfigurationError
from ..transports.invocation import enter_invocation, exit_invocation

__all__ = [
    "DEFAULT_DEADLINE_MARGIN_S",
    "DEFAULT_FLUSH_TIMEOUT_S",
    "Invocation",
    "Options",
    "Remaining",
    "flush_clients",
    "flush_everything",
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
    return [client for client in _lifecycle.clients() if isinstance(client, Client)]


def _clients(client: Optional[Client]) -> List[Client]:
    """The clients to flush: ``client`` if given, else the default client (created from the
    environment when it can be) and every other live client of this process."""
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


def flush_clients(clients: Iterable[Client], timeout: Optional[float], *, note: str = "") -> Tuple[int, int]:
    """Flush ``clients`` one after the other under one deadline ``timeout`` seconds from
    now; returns (sent, still unsent). Blocks; one client's failure is logged (with
    ``note`` after the message) and the others are flushed still; never raises for it."""
    deadline = Deadline.after(timeout)
    sent = unsent = 0
    for client in clients:
        try:
            result = client.flush(deadline.remaining())
        except Exception:
            log.exception("klime: flushing %r failed%s", client, note)
            continue
        sent += result.sent
        unsent += result.unsent
    return sent, unsent


def flush_everything(timeout: Optional[float]) -> Tuple[int, int]:
    """Flush the default client and every live client within ``timeout`` seconds; returns
    (sent, still unsent). Blocks; never raises for one client's failure."""
    return flush_clients(_clients(None), timeout)


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
            for client in _clients(self.options.client):
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
            _, unsent = flush_clients(
                _clients(self.options.client), timeout, note="; the handler's outcome is unchanged"
            )
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
