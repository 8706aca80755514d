"""Klime's answers: what Klime's servers say to a request, decided from its bytes alone.

The wire protocol of DESIGN.md section 3: the write key (401), the body's size (413) and
shape (400), then each event on its own (a failed event does not fail its batch: 200 with
``errors[]``), and the answers the accepting faults (``partial``, ``non_json_200``,
``unexpected_200``) and the ``status`` fault give. No sockets and no threads: the HTTP layer
reads the request, asks here, and writes what it is told.

Imports: the standard library, :mod:`klime._config` (the limits) and
:mod:`klime.devserver._faults` (the :class:`Fault` being applied).
"""

from __future__ import annotations

import http
import json
from dataclasses import dataclass, field
from typing import Any

from klime._config import MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_REQUEST_BYTES

from ._faults import Fault

__all__ = [
    "JSON",
    "PHRASES",
    "TEXT",
    "Answer",
    "Refusal",
    "answer_batch",
    "answer_status_fault",
    "authorized",
    "check_event",
    "error_body",
    "parse_batch",
]

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
PHRASES = {s.value: s.phrase for s in http.HTTPStatus}

# Re-encoding a parsed event can make it longer than its text in the body only through number
# spellings ("1e15" -> "1000000000000000.0", at most ~4.5x). Every event of a body shorter than
# this therefore fits MAX_EVENT_BYTES, and measuring each one can be skipped.
_SMALL_BODY_BYTES = MAX_EVENT_BYTES // 5


class Refusal(Exception):
    """Answer ``status`` with a JSON error body; ``close`` also closes the connection."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


@dataclass
class Answer:
    """A batch answer: the status and body to send, and the events it accepted."""

    status: int
    body: bytes
    content_type: str = JSON
    headers: list[tuple[str, str]] = field(default_factory=list)
    accepted: list[Any] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def error_body(message: str) -> bytes:
    """``{"status": "error", "message": ...}`` as bytes."""
    return json.dumps({"status": "error", "message": message}).encode("utf-8")


def authorized(header: str | None, write_key: str | None) -> bool:
    """Whether ``Authorization: header`` is a Bearer token Klime takes (any, or ``write_key``)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return False
    return write_key is None or token == write_key


def answer_batch(body: bytes | None, *, authorized: bool, content_type: str, fault: Fault | None) -> Answer:
    """Klime's answer to ``POST /v1/batch`` (``body`` None: it exceeded the size limit).

    Raises :class:`Refusal` for a request refused whole (401, 413, 400). An accepting
    ``fault`` alters only the answer to a request that would have been accepted.
    """
    if not authorized:
        raise Refusal(401, "missing or invalid write key")
    if body is None:
        raise Refusal(413, f"request body exceeds {MAX_REQUEST_BYTES} bytes")
    if content_type.split(";", 1)[0].strip().lower() != JSON:
        raise Refusal(400, "Content-Type must be application/json")
    batch = parse_batch(body)

    accepted: list[Any] = []
    errors: list[dict[str, Any]] = []
    measure = len(body) > _SMALL_BODY_BYTES
    for index, event in enumerate(batch):
        problem = check_event(event, measure)
        if problem is None:
            accepted.append(event)
        else:
            errors.append({"index": index, "message": problem[1], "code": problem[0]})
    kind = fault.kind if fault is not None else None
    if fault is not None and kind == "partial":
        failed_already = {e["index"] for e in errors}
        for index in sorted(set(fault.failed_indices)):
            if index < len(batch) and index not in failed_already:
                message = "event rejected by injected fault"
                errors.append({"index": index, "message": message, "code": "injected_failure"})
        errors.sort(key=lambda e: int(e["index"]))
        dropped = {e["index"] for e in errors}
        accepted = [ev for i, ev in enumerate(batch) if i not in dropped]

    if fault is not None and kind == "non_json_200":
        payload, media = (fault.body if fault.body is not None else b"OK"), TEXT
    elif fault is not None and kind == "unexpected_200":
        payload, media = (fault.body if fault.body is not None else b'{"ok":true,"extra":[1]}'), JSON
    else:
        summary = {"status": "ok", "accepted": len(accepted), "failed": len(errors), "errors": errors}
        payload, media = json.dumps(summary).encode("utf-8"), JSON
    return Answer(200, payload, media, accepted=accepted, errors=errors)


def answer_status_fault(fault: Fault) -> Answer:
    """The answer of a ``status`` fault: its status, its body (or a JSON error), Retry-After."""
    status = int(fault.status or 500)
    if fault.body is not None:
        payload = fault.body
    else:
        payload = error_body(f"injected fault: {status} {PHRASES.get(status, '')}".rstrip())
    media = JSON if payload[:1] in (b"{", b"[") else TEXT
    headers = [("Retry-After", fault.retry_after)] if fault.retry_after else []
    return Answer(status, payload, media, headers)


def parse_batch(body: bytes) -> list[Any]:
    """Return the ``batch`` list of a request body, or raise :class:`Refusal` (400)."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise Refusal(400, "body is not valid JSON") from None
    if type(payload) is not dict:
        raise Refusal(400, 'body must be a JSON object with a "batch" list')
    batch = payload.get("batch")
    if type(batch) is not list:
        raise Refusal(400, 'body must have a "batch" list of events')
    if not batch:
        raise Refusal(400, f"batch is empty; send 1 to {MAX_BATCH_EVENTS} events")
    if len(batch) > MAX_BATCH_EVENTS:
        raise Refusal(400, f"batch has {len(batch)} events; at most {MAX_BATCH_EVENTS} are allowed")
    return batch


def check_event(event: Any, measure: bool) -> tuple[str, str] | None:
    """Return ``(code, message)`` when ``event`` is invalid, else None; ``measure`` also
    checks its encoded size. Kept cheap: it runs for every event of every request."""
    if type(event) is not dict:
        return "invalid_event", "event must be a JSON object"
    if measure:
        size = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > MAX_EVENT_BYTES:
            return "event_too_large", f"event is {size} bytes; at most {MAX_EVENT_BYTES} allowed"
    get = event.get
    kind = get("type")
    if kind != "track" and kind != "identify" and kind != "group":
        return "invalid_event", 'type must be "track", "identify" or "group"'
    value = get("messageId")
    if type(value) is not str or not value:
        return "invalid_event", "messageId must be a non-empty string"
    if type(get("timestamp")) is not str:
        return "invalid_event", "timestamp must be a string"
    if kind == "track":
        value = get("event")
        if type(value) is not str or not value:
            return "invalid_event", "track needs a non-empty event name"
        if not (_nonempty_str(get("userId")) or _nonempty_str(get("groupId"))):
            return "invalid_event", "track needs userId or groupId"
        if "traits" in event:
            return "invalid_event", "traits are not allowed on track (use properties)"
        if "properties" in event and type(event["properties"]) is not dict:
            return "invalid_event", "properties must be a JSON object"
    else:
        needed = "userId" if kind == "identify" else "groupId"
        if not _nonempty_str(get(needed)):
            return "invalid_event", f"{kind} needs a non-empty {needed}"
        if "properties" in event:
            return "invalid_event", f"properties are not allowed on {kind} (use traits)"
        if "traits" in event and type(event["traits"]) is not dict:
            return "invalid_event", "traits must be a JSON object"
    if "context" in event and type(event["context"]) is not dict:
        return "invalid_event", "context must be a JSON object"
    return None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _nonempty_str(value: Any) -> bool:
    return type(value) is str and value != ""
