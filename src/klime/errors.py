"""Exceptions raised by klime.

::

    KlimeError
    ├── ConfigurationError   bad or missing option (raised by the constructor)
    ├── ValidationError      bad input to track/identify/group (raised at the call; nothing queued)
    ├── SendError            a batch could not be delivered (raised by *_sync; given to on_error)
    └── SpoolUnavailable     the durable spool cannot be used now (corrupt, unwritable, full, locked)

No message, repr or attribute of these exceptions ever contains the write key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from ._wire_event import Event, as_events

if TYPE_CHECKING:
    from ._models import BatchResponse

__all__ = ["KlimeError", "ConfigurationError", "ValidationError", "SendError", "SpoolUnavailable"]

#: Response bodies quoted in errors are cut to this many characters.
MAX_QUOTED_BODY = 500


class KlimeError(Exception):
    """Base class of every exception klime raises."""


class ConfigurationError(KlimeError, ValueError):
    """An option is missing or has a bad value; the message names the option."""


class ValidationError(KlimeError, ValueError):
    """Input to ``track``/``identify``/``group`` was rejected; nothing was queued."""


class SendError(KlimeError):
    """A batch (or part of it) was not accepted by the destination.

    ``SendError(message, status_code=None, events=None, response=None)``; klime 1.x's
    ``SendError(message, events)`` (a list in second place) builds the same error.

    Attributes:
        status_code: the HTTP status of the last attempt, or None (network error, timeout,
            queue overflow, shutdown).
        events: the affected events as wire dicts (camelCase), exactly as (they would have
            been) sent; each is a :class:`klime.types.Event`, a ``dict`` that also reads as
            klime 1.x's event objects (``.messageId``, ``.type``, ``.to_dict()``).
        response: the parsed :class:`~klime.BatchResponse` when the server answered 2xx with a
            partial failure, else None.
        retryable: True when the failure was transient (retries ran out or the deadline did).
    """

    def __init__(
        self,
        message: str,
        status_code: int | Sequence[Any] | None = None,
        events: Sequence[Any] | None = None,
        response: BatchResponse | None = None,
        *,
        retryable: bool = False,
    ) -> None:
        # klime 1.x built it as SendError(message, events): a list in second place is the events
        if status_code is not None and not isinstance(status_code, int):
            if events is not None:
                raise TypeError("SendError(message, events) takes the events once")
            status_code, events = None, status_code
        super().__init__(message)
        self.message = message
        self.status_code: int | None = status_code
        self.events: list[Event] = as_events(events or ())
        self.response = response
        self.retryable = retryable

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return (
            f"SendError({self.message!r}, status_code={self.status_code!r}, "
            f"events=<{len(self.events)} events>)"
        )

    def __reduce__(self) -> Any:  # picklable across multiprocessing
        return (
            _rebuild_send_error,
            (self.message, self.status_code, self.events, self.response, self.retryable),
        )


def _rebuild_send_error(
    message: str,
    status_code: int | None,
    events: list[dict[str, Any]],
    response: BatchResponse | None,
    retryable: bool,
) -> SendError:
    return SendError(message, status_code, events, response, retryable=retryable)


class SpoolUnavailable(KlimeError):
    """The durable spool (:mod:`klime.spool`) cannot be used for this operation.

    Raised by every spool operation instead of an ``sqlite3``/``OSError``; the caller degrades
    to memory. ``reason`` is one of ``"corrupt"`` (the database was damaged; it has been moved
    aside and a fresh one started when ``recovered`` is True), ``"unwritable"`` (permissions, a
    read-only file system, not a directory), ``"full"`` (no space left), ``"locked"`` (another
    process held the database past the busy timeout), ``"version"`` (written by a newer klime),
    ``"closed"``, ``"unsupported"`` (no ``fcntl`` on this platform) or ``"error"``. ``path``
    is the spool directory. Transient reasons (``locked``, ``full``) may clear up by
    themselves; the spool object stays usable.
    """

    def __init__(
        self, message: str, reason: str = "error", path: str | None = None, *, recovered: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.path = path
        self.recovered = recovered

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"SpoolUnavailable({self.message!r}, reason={self.reason!r})"

    def __reduce__(self) -> Any:  # picklable across multiprocessing
        return (_rebuild_spool_unavailable, (self.message, self.reason, self.path, self.recovered))


def _rebuild_spool_unavailable(
    message: str, reason: str, path: str | None, recovered: bool
) -> SpoolUnavailable:
    return SpoolUnavailable(message, reason, path, recovered=recovered)


def mask_secret(text: str, secret: str | None) -> str:
    """``text`` with every occurrence of ``secret`` (and of ``Bearer <secret>``) replaced by
    ``***``: for server text quoted back to the user, which may echo the request's headers."""
    if not secret or not text:
        return text
    return text.replace(f"Bearer {secret}", "***").replace(secret, "***")


def quote_body(body: bytes | str | None, *, secret: str | None = None) -> str:
    """A short, printable excerpt of a response body for an error message, with ``secret``
    (the write key) masked before it is cut, so that no part of it can show."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = mask_secret(text, secret).strip()
    if len(text) > MAX_QUOTED_BODY:
        text = text[:MAX_QUOTED_BODY] + f"... ({len(text) - MAX_QUOTED_BODY} more characters)"
    return text
