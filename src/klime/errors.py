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

from typing import TYPE_CHECKING, Any

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

    Attributes:
        status_code: the HTTP status of the last attempt, or None (network error, timeout,
            queue overflow, shutdown).
        events: the affected events as wire dicts (camelCase), exactly as (they would have
            been) sent.
        response: the parsed :class:`~klime.BatchResponse` when the server answered 2xx with a
            partial failure, else None.
        retryable: True when the failure was transient (retries ran out or the deadline did).
    """

    def __init__(
        self,
        message: str,
        status_code: int | None = None,
        events: list[dict[str, Any]] | None = None,
        response: BatchResponse | None = None,
        *,
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.events: list[dict[str, Any]] = events if events is not None else []
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


def quote_body(body: bytes | str | None) -> str:
    """A short, printable excerpt of a response body for an error message."""
    if not body:
        return ""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    text = text.strip()
    if len(text) > MAX_QUOTED_BODY:
        text = text[:MAX_QUOTED_BODY] + f"... ({len(text) - MAX_QUOTED_BODY} more characters)"
    return text
