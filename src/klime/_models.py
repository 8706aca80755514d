"""Plain result objects returned by klime's public calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BatchResponse", "EventError", "FlushResult"]


def _cut(text: str, limit: int = 500) -> str:
    """Server-provided text, shortened: it ends up in logs and exception messages."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class EventError:
    """One event the server rejected inside an otherwise successful request."""

    index: int
    message: str
    code: str | None = None


@dataclass(frozen=True)
class BatchResponse:
    """What the server said about one request (or, for ``*_sync`` calls, about the call).

    ``status`` is the server's ``status`` field (``"ok"``), ``accepted``/``failed`` count
    events, ``errors`` lists the failed ones by index into the request's batch.
    ``status_code`` is the HTTP status.
    """

    status: str
    accepted: int
    failed: int = 0
    errors: tuple[EventError, ...] = ()
    status_code: int = 200

    @classmethod
    def from_body(cls, payload: Any, count: int, status_code: int) -> BatchResponse:
        """Parse a 2xx body; anything that is not the documented shape counts as all accepted."""
        if not isinstance(payload, dict):
            return cls("ok", count, 0, (), status_code)
        errors: list[EventError] = []
        raw_errors = payload.get("errors")
        if isinstance(raw_errors, list):
            for item in raw_errors:
                if not isinstance(item, dict):
                    continue
                index = item.get("index")
                if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < count:
                    continue
                message = item.get("message")
                code = item.get("code")
                errors.append(
                    EventError(
                        index,
                        _cut(str(message)) if message is not None else "rejected",
                        _cut(str(code), 100) if code is not None else None,
                    )
                )
        failed = len({e.index for e in errors})
        raw_failed = payload.get("failed")
        if not errors and isinstance(raw_failed, int) and not isinstance(raw_failed, bool) and raw_failed > 0:
            # The server said some failed without saying which: we cannot know which to
            # report, so the count is kept and the events are treated as accepted.
            failed = 0
        status = payload.get("status")
        return cls(
            status if isinstance(status, str) else "ok",
            count - failed,
            failed,
            tuple(errors),
            status_code,
        )


@dataclass(frozen=True)
class FlushResult:
    """What ``flush()`` or ``shutdown()`` achieved before returning.

    ``sent``, ``failed`` and ``dropped`` count the events resolved during the call
    (acknowledged, reported to ``on_error`` after a server failure, dropped without being
    sent); ``unsent`` is what was still waiting when the call returned (0 means everything
    queued before the call was resolved). ``timed_out`` is True when the deadline ran out.
    """

    sent: int = 0
    failed: int = 0
    dropped: int = 0
    unsent: int = 0
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing failed, was dropped or is left unsent."""
        return not (self.failed or self.dropped or self.unsent)
