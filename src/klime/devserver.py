"""A Klime-compatible collector on 127.0.0.1, for the demo, the test suite and debugging.

It speaks the wire protocol of DESIGN.md section 3 (``POST /v1/batch``), validates requests
and events the way Klime's servers do, records what arrived, and can misbehave on purpose
(fault injection) so that retry, timeout and partial-failure paths can be exercised over real
sockets::

    from klime.devserver import Collector, Fault

    with Collector() as collector:            # binds 127.0.0.1 on a free port
        collector.respond(Fault.status_code(500), Fault.retry(429, retry_after="1"))
        ...                                   # point the SDK at collector.url
        assert collector.wait_for_events(3, timeout=5)
        print(collector.events())

From a shell, ``python -m klime.devserver --help``; ``python -m klime.devserver --port 0 --
CMD ARGS...`` runs CMD with ``KLIME_ENDPOINT`` and ``KLIME_WRITE_KEY`` pointing here, echoes
what arrives and prints a summary.

This module imports only the standard library and :mod:`klime._config`, so it starts fast and
keeps working while the rest of the SDK changes.

Threading: the server answers every connection in its own daemon thread (HTTP/1.1 keep-alive).
Every public method of :class:`Collector` is thread-safe; the ones that block say so.
"""

from __future__ import annotations

import argparse
import email.utils
import http
import http.server
import json
import math
import os
import random
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, TextIO
from urllib.parse import parse_qs

from klime._config import BATCH_PATH, MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_REQUEST_BYTES

__all__ = ["FAULT_KINDS", "Collector", "Fault", "RecordedRequest", "main"]

#: Every fault kind :class:`Fault` accepts.
FAULT_KINDS = frozenset(
    {
        "status",
        "partial",
        "non_json_200",
        "unexpected_200",
        "reset_before_read",
        "reset_after_read",
        "blackhole",
        "slow",
        "drip",
    }
)

#: Delays used when a fault is named without one (``Fault.parse("slow")``, random schedules).
DEFAULT_SLOW_DELAY = 0.1
DEFAULT_DRIP_DELAY = 0.01
#: ``drip`` writes the response in pieces of this many bytes, ``delay`` seconds apart.
DRIP_CHUNK_BYTES = 16

# A body over MAX_REQUEST_BYTES is read and thrown away (so the client gets its 413 on a
# connection that stays usable) up to this size; beyond it the connection is closed instead.
_DISCARD_LIMIT = 4 * MAX_REQUEST_BYTES
_READ_CHUNK = 64 * 1024
# Re-encoding a parsed event can make it longer than its text in the body only through number
# spellings ("1e15" -> "1000000000000000.0", at most ~4.5x). Every event of a body shorter than
# this therefore fits MAX_EVENT_BYTES, and measuring each one can be skipped.
_SMALL_BODY_BYTES = MAX_EVENT_BYTES // 5
_CONTROL_PREFIX = "/_klime/"
_JSON = "application/json"
_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}
_NO_BODY_STATUSES = frozenset({204, 205, 304})
_EVENT_TYPES = ("track", "identify", "group")


class _HTTPError(Exception):
    """Answer ``status`` with a JSON error body (raised inside the request handler)."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close


class _ClientGone(Exception):
    """The client closed the connection in the middle of a request."""


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request that reached the collector (control endpoints excepted).

    ``status`` is the status answered, or None when the connection was reset or black-holed;
    ``fault`` is the :attr:`Fault.name` applied, None when the request was handled normally.
    ``received_at`` is :func:`time.monotonic` when the body had been read (or when the request
    line had been, for a body never read). ``headers`` hold the request headers as sent,
    the write key included: keep them in-process (the control endpoint redacts it).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None
    fault: str | None
    received_at: float

    def json(self) -> Any:
        """Return the body parsed as JSON (raises :class:`ValueError` when it is not)."""
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        """Return the request header ``name`` (case-insensitive), or None."""
        lowered = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lowered:
                return value
        return None


@dataclass(frozen=True)
class Fault:
    """A scripted misbehaviour for one request to ``/v1/batch`` (or for every one, as a mode).

    Kinds:

    - ``"status"``: answer ``status`` with ``{"status": "error", "message": ...}`` (and
      ``Retry-After: retry_after`` when set); nothing is accepted.
    - ``"partial"``: handle the request normally, then also fail the events at
      ``failed_indices``: 200 with ``failed > 0`` and one ``errors[]`` entry per failed event.
    - ``"non_json_200"``: handle normally, answer 200 ``text/plain`` ``OK`` (or ``body``).
    - ``"unexpected_200"``: handle normally, answer 200 JSON with unexpected fields.
    - ``"reset_before_read"``: reset the connection (RST) without reading the body.
    - ``"reset_after_read"``: read the body, then reset without answering (the ambiguous case:
      nothing is recorded as accepted, the client cannot know).
    - ``"blackhole"``: read the body, then never answer until :meth:`Collector.stop`,
      :meth:`Collector.reset` or :meth:`Collector.set_mode` releases it; then reset.
    - ``"slow"``: handle normally (events are recorded at once), answer after ``delay`` s.
    - ``"drip"``: handle normally, write the response :data:`DRIP_CHUNK_BYTES` bytes at a
      time, ``delay`` seconds apart.

    ``partial``, ``non_json_200``, ``unexpected_200``, ``slow`` and ``drip`` change only a
    request that would have been accepted: a bad key still gets 401, a bad body 400. A non-zero
    ``delay`` on ``status`` waits that long before answering. ``body`` replaces the response
    body of ``status``, ``non_json_200`` and ``unexpected_200``.
    """

    kind: str
    status: int | None = None
    retry_after: str | None = None
    delay: float = 0.0
    body: bytes | None = None
    failed_indices: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {sorted(FAULT_KINDS)}")
        if self.kind == "status":
            if isinstance(self.status, bool) or not isinstance(self.status, int):
                raise ValueError("a 'status' fault needs an int status")
            if not 200 <= self.status <= 599:
                raise ValueError(f"status must be within 200..599, not {self.status}")
        elif self.status is not None:
            raise ValueError("status applies only to the 'status' fault kind")
        if self.retry_after is not None:
            if not isinstance(self.retry_after, str) or any(c in self.retry_after for c in "\r\n"):
                raise ValueError("retry_after must be a one-line string")
        delay = float(self.delay)
        if not math.isfinite(delay) or delay < 0:
            raise ValueError(f"delay must be a finite number >= 0, not {self.delay!r}")
        object.__setattr__(self, "delay", delay)
        if self.body is not None and not isinstance(self.body, bytes):
            raise ValueError("body must be bytes")
        indices = tuple(self.failed_indices)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in indices):
            raise ValueError("failed_indices must be ints >= 0")
        object.__setattr__(self, "failed_indices", indices)

    @property
    def name(self) -> str:
        """A short name: the status (``"500"``) for ``status`` faults, else the kind."""
        return str(self.status) if self.kind == "status" else self.kind

    # -- convenience constructors ---------------------------------------------------------

    @classmethod
    def status_code(
        cls,
        status: int,
        *,
        retry_after: str | int | float | None = None,
        body: bytes | None = None,
        delay: float = 0.0,
    ) -> Fault:
        """Answer ``status`` (e.g. 500) with a JSON error body and optional ``Retry-After``."""
        return cls(
            "status",
            status=status,
            retry_after=None if retry_after is None else _header_value(retry_after),
            body=body,
            delay=delay,
        )

    @classmethod
    def retry(cls, status: int = 429, *, retry_after: str | int | float | None = None) -> Fault:
        """Answer ``status`` (429 by default) with ``Retry-After: retry_after``."""
        return cls.status_code(status, retry_after=retry_after)

    @classmethod
    def partial(cls, *failed_indices: int) -> Fault:
        """Accept the batch but fail the events at ``failed_indices`` (0-based)."""
        return cls("partial", failed_indices=tuple(failed_indices))

    @classmethod
    def non_json_200(cls, body: bytes = b"OK") -> Fault:
        """Accept the batch, answer 200 ``text/plain`` ``body``."""
        return cls("non_json_200", body=body)

    @classmethod
    def unexpected_200(cls, body: bytes | None = None) -> Fault:
        """Accept the batch, answer 200 JSON without the expected fields (or ``body``)."""
        return cls("unexpected_200", body=body)

    @classmethod
    def reset_before_read(cls) -> Fault:
        """Reset the connection without reading the request body."""
        return cls("reset_before_read")

    @classmethod
    def reset_after_read(cls) -> Fault:
        """Read the request, then reset the connection without answering."""
        return cls("reset_after_read")

    @classmethod
    def blackhole(cls) -> Fault:
        """Read the request and never answer (until released; then reset)."""
        return cls("blackhole")

    @classmethod
    def slow(cls, delay: float = DEFAULT_SLOW_DELAY) -> Fault:
        """Accept the batch, answer after ``delay`` seconds."""
        return cls("slow", delay=delay)

    @classmethod
    def drip(cls, delay: float = DEFAULT_DRIP_DELAY) -> Fault:
        """Accept the batch, write the response in small pieces ``delay`` seconds apart."""
        return cls("drip", delay=delay)

    @classmethod
    def parse(cls, spec: str) -> Fault:
        """Build a fault from a short spec.

        ``"500"`` (any status), ``"status:503"``, a kind name (``"reset_before_read"``),
        ``"slow:0.5"`` / ``"drip:0.01"`` (delay in seconds), ``"partial:0,3"`` (indices).
        """
        kind, _, arg = spec.strip().partition(":")
        kind = kind.strip()
        arg = arg.strip()
        try:
            if kind.isdigit():
                return cls.status_code(int(kind))
            if kind == "status":
                return cls.status_code(int(arg))
            if kind in ("slow", "drip"):
                return cls(kind, delay=float(arg) if arg else _default_delay(kind))
            if kind == "partial":
                indices = tuple(int(i) for i in arg.split(",") if i.strip()) if arg else (0,)
                return cls("partial", failed_indices=indices)
        except ValueError as exc:
            raise ValueError(f"bad fault spec {spec!r}: {exc}") from exc
        if arg:
            raise ValueError(f"bad fault spec {spec!r}: {kind!r} takes no argument")
        return cls(kind)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fault:
        """Build a fault from its JSON form (see :meth:`to_dict`); ``body`` is a UTF-8 str."""
        if not isinstance(data, Mapping):
            raise ValueError("a fault must be a JSON object")
        unknown = set(data) - {"kind", "status", "retry_after", "delay", "body", "failed_indices"}
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        body = data.get("body")
        if body is not None and not isinstance(body, str):
            raise ValueError("body must be a string")
        retry_after = data.get("retry_after")
        indices = data.get("failed_indices") or ()
        if not isinstance(indices, (list, tuple)):
            raise ValueError("failed_indices must be a list")
        kind = data.get("kind")
        if not isinstance(kind, str):
            raise ValueError("a fault needs a 'kind' string")
        delay = data.get("delay", 0.0)
        if isinstance(delay, bool) or not isinstance(delay, (int, float)):
            raise ValueError("delay must be a number")
        return cls(
            kind,
            status=data.get("status"),
            retry_after=None if retry_after is None else _header_value(retry_after),
            delay=delay,
            body=None if body is None else body.encode("utf-8"),
            failed_indices=tuple(indices),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form accepted by :meth:`from_dict` and ``POST /_klime/mode``."""
        data: dict[str, Any] = {"kind": self.kind}
        if self.status is not None:
            data["status"] = self.status
        if self.retry_after is not None:
            data["retry_after"] = self.retry_after
        if self.delay:
            data["delay"] = self.delay
        if self.body is not None:
            data["body"] = self.body.decode("utf-8", "replace")
        if self.failed_indices:
            data["failed_indices"] = list(self.failed_indices)
        return data


def _default_delay(kind: str) -> float:
    return DEFAULT_DRIP_DELAY if kind == "drip" else DEFAULT_SLOW_DELAY


def _header_value(value: str | int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _fault_from_json(data: Any) -> Fault:
    if isinstance(data, str):
        return Fault.parse(data)
    if isinstance(data, Mapping):
        return Fault.from_dict(data)
    raise ValueError("a fault is a JSON object or a spec string")


# --------------------------------------------------------------------------------------------
# Validation (DESIGN.md section 3)
# --------------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _event_size(event: Any) -> int:
    return len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _nonempty_str(value: Any) -> bool:
    return type(value) is str and value != ""


def _check_event(event: Any, measure: bool) -> tuple[str, str] | None:
    """Return ``(code, message)`` when ``event`` is invalid, else None. Kept cheap: it runs
    for every event of every request."""
    if type(event) is not dict:
        return "invalid_event", "event must be a JSON object"
    if measure:
        size = _event_size(event)
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


def _parse_batch(body: bytes) -> list[Any]:
    """Return the ``batch`` list of a request body, or raise :class:`_HTTPError` (400)."""
    try:
        payload = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        raise _HTTPError(400, "body is not valid JSON") from None
    if type(payload) is not dict:
        raise _HTTPError(400, 'body must be a JSON object with a "batch" list')
    batch = payload.get("batch")
    if type(batch) is not list:
        raise _HTTPError(400, 'body must have a "batch" list of events')
    if not batch:
        raise _HTTPError(400, f"batch is empty; send 1 to {MAX_BATCH_EVENTS} events")
    if len(batch) > MAX_BATCH_EVENTS:
        raise _HTTPError(400, f"batch has {len(batch)} events; at most {MAX_BATCH_EVENTS} are allowed")
    return batch


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
        _date_cache[0] = now
    return str(_date_cache[1])


def _error_body(message: str) -> bytes:
    return json.dumps({"status": "error", "message": message}).encode("utf-8")


def _clock() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _short_json(value: Any, limit: int = 240) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _describe_event(event: Mapping[str, Any]) -> str:
    kind = str(event.get("type"))
    parts = [kind.ljust(8)]
    if kind == "track":
        parts.append(json.dumps(event.get("event"), ensure_ascii=False))
    elif kind == "group":
        parts.append(str(event.get("groupId")))
    if "userId" in event:
        parts.append(f"user={event['userId']}")
    if kind == "track" and "groupId" in event:
        parts.append(f"group={event['groupId']}")
    extra = event.get("properties" if kind == "track" else "traits")
    if extra:
        parts.append(_short_json(extra))
    return "  ".join(parts)


def _summary(events: Sequence[Mapping[str, Any]]) -> str:
    counts = {kind: 0 for kind in _EVENT_TYPES}
    for event in events:
        kind = event.get("type")
        if kind in counts:
            counts[str(kind)] += 1
    return (
        f"{len(events)} events arrived: {counts['track']} track, "
        f"{counts['identify']} identify, {counts['group']} group"
    )


# --------------------------------------------------------------------------------------------
# The HTTP server
# --------------------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    collector: Collector

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS look-up; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.collector._stopping:
            return  # the client went away, or we are shutting down
        sys.stderr.write("klime devserver: error while handling a request:\n")
        traceback.print_exc(file=sys.stderr)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "klime-devserver"
    disable_nagle_algorithm = True
    server: _Server
    _busy = False

    # -- connection life cycle ------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        self.server.collector._opened(self)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.collector._closed(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- routing --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self._busy = True
        collector = self.server.collector
        path = self.path.split("?", 1)[0]
        started = time.monotonic()
        try:
            if path == BATCH_PATH and self.command == "POST":
                self._batch(collector, started)
            elif path.startswith(_CONTROL_PREFIX):
                self._control(collector, path)
            elif path == BATCH_PATH:
                self._refuse(collector, 405, f"{self.command} not allowed; use POST")
            else:
                self._refuse(collector, 404, f"no such endpoint: {path}")
        except _ClientGone:
            self.close_connection = True
        finally:
            self._busy = False

    do_POST = _dispatch
    do_GET = _dispatch
    do_PUT = _dispatch
    do_PATCH = _dispatch
    do_DELETE = _dispatch
    do_HEAD = _dispatch
    do_OPTIONS = _dispatch

    def _refuse(self, collector: Collector, status: int, message: str) -> None:
        try:
            body = self._read_body()
        except _HTTPError as exc:
            status, message, body = exc.status, exc.message, b""
            self.close_connection = True
        extra = [("Allow", "POST")] if status == 405 else []
        collector._record(self._recorded(body or b"", status, None, time.monotonic()))
        collector._echo(f"-> {status} {self.command} {self.path.split('?', 1)[0]}")
        self._send(status, _error_body(message), extra=extra)

    # -- POST /v1/batch --------------------------------------------------------------------

    def _batch(self, collector: Collector, started: float) -> None:
        fault = collector._next_fault()
        kind = fault.kind if fault is not None else None
        name = fault.name if fault is not None else None

        if kind == "reset_before_read":
            collector._record(self._recorded(b"", None, name, started))
            collector._echo("-> reset before reading (fault)")
            self._abort()
            return
        try:
            body = self._read_body()
        except _HTTPError as exc:
            collector._record(self._recorded(b"", exc.status, name, time.monotonic()))
            collector._echo(f"-> {exc.status} {exc.message}")
            self.close_connection = True
            self._send(exc.status, _error_body(exc.message))
            return
        received = time.monotonic()
        raw = body if body is not None else b""

        if fault is not None and kind in ("reset_after_read", "blackhole", "status"):
            if kind == "status":
                status = int(fault.status or 500)
                collector._record(self._recorded(raw, status, name, received))
                collector._echo(f"-> {status} (fault)")
                if fault.delay and collector._stop_event.wait(fault.delay):
                    self._abort()
                    return
                extra = [("Retry-After", fault.retry_after)] if fault.retry_after else []
                payload = (
                    fault.body
                    if fault.body is not None
                    else _error_body(f"injected fault: {status} {_PHRASES.get(status, '')}".rstrip())
                )
                self._send(status, payload, content_type=_content_type(payload), extra=extra)
                return
            collector._record(self._recorded(raw, None, name, received))
            if kind == "blackhole":
                collector._echo("-> no answer (blackhole fault)")
                collector._blackhole_event().wait()
            else:
                collector._echo("-> reset after reading (fault)")
            self._abort()
            return

        # Normal handling; the remaining faults only alter a request that is accepted.
        accepted: list[Any] = []
        errors: list[dict[str, Any]] = []
        try:
            if not collector._authorized(self.headers.get("Authorization")):
                raise _HTTPError(401, "missing or invalid write key")
            if body is None:
                raise _HTTPError(413, f"request body exceeds {MAX_REQUEST_BYTES} bytes")
            content_type = self.headers.get("Content-Type", "")
            if content_type.split(";", 1)[0].strip().lower() != _JSON:
                raise _HTTPError(400, "Content-Type must be application/json")
            batch = _parse_batch(body)
        except _HTTPError as exc:
            collector._record(self._recorded(raw, exc.status, name, received))
            reason = "bad write key" if exc.status == 401 else exc.message
            collector._echo(f"-> {exc.status} {reason}")
            self._send(exc.status, _error_body(exc.message))
            return

        measure = len(body) > _SMALL_BODY_BYTES
        for index, event in enumerate(batch):
            problem = _check_event(event, measure)
            if problem is None:
                accepted.append(event)
            else:
                errors.append({"index": index, "message": problem[1], "code": problem[0]})
        if kind == "partial" and fault is not None:
            failed_already = {e["index"] for e in errors}
            for index in sorted(set(fault.failed_indices)):
                if index < len(batch) and index not in failed_already:
                    errors.append(
                        {
                            "index": index,
                            "message": "event rejected by injected fault",
                            "code": "injected_failure",
                        }
                    )
            errors.sort(key=lambda e: int(e["index"]))
            dropped = {e["index"] for e in errors}
            accepted = [ev for i, ev in enumerate(batch) if i not in dropped]

        content_type = _JSON
        if kind == "non_json_200" and fault is not None:
            payload = fault.body if fault.body is not None else b"OK"
            content_type = "text/plain; charset=utf-8"
        elif kind == "unexpected_200" and fault is not None:
            payload = fault.body if fault.body is not None else b'{"ok":true,"extra":[1]}'
        else:
            payload = json.dumps(
                {"status": "ok", "accepted": len(accepted), "failed": len(errors), "errors": errors}
            ).encode("utf-8")

        collector._record(self._recorded(body, 200, name, received), accepted)
        if collector._echo_stream is not None:
            for event in accepted:
                collector._echo(_describe_event(event))
            for error in errors:
                collector._echo(f"-> event #{error['index']} failed: {error['message']} ({error['code']})")
            if fault is not None:
                collector._echo(f"-> 200 ({fault.name} fault)")

        if kind == "slow" and fault is not None and fault.delay:
            if collector._stop_event.wait(fault.delay):
                self._abort()
                return
        drip = fault.delay if kind == "drip" and fault is not None else None
        self._send(200, payload, content_type=content_type, drip=drip)

    # -- control endpoints ----------------------------------------------------------------

    def _control(self, collector: Collector, path: str) -> None:
        try:
            body = self._read_body()
            if body is None:
                raise _HTTPError(413, "control request too large")
            route = path[len(_CONTROL_PREFIX) :].rstrip("/")
            if self.command == "GET" and route in ("events", "requests", "health"):
                result = self._control_get(collector, route)
            elif self.command == "POST" and route in ("reset", "mode", "respond", "random"):
                result = self._control_post(collector, route, body)
            elif route in ("events", "requests", "health", "reset", "mode", "respond", "random"):
                raise _HTTPError(405, f"{self.command} not allowed on {path}")
            else:
                raise _HTTPError(404, f"no such control endpoint: {path}")
        except _HTTPError as exc:
            self.close_connection = self.close_connection or exc.close
            self._send(exc.status, _error_body(exc.message))
            return
        self._send(200, json.dumps(result, default=str).encode("utf-8"))

    def _control_get(self, collector: Collector, route: str) -> Any:
        if route == "health":
            return {"status": "ok"}
        if route == "requests":
            return [_request_summary(r) for r in collector.requests()]
        params = parse_qs(self.path.partition("?")[2])
        try:
            wait_for = int(params.get("min", ["0"])[0])
            timeout = min(float(params.get("timeout", ["0"])[0]), 60.0)
        except ValueError:
            raise _HTTPError(400, "min must be an int and timeout a number") from None
        if wait_for > 0 and timeout > 0:
            collector.wait_for_events(wait_for, timeout)
        return collector.events()

    def _control_post(self, collector: Collector, route: str, body: bytes) -> Any:
        try:
            data = json.loads(body) if body.strip() else None
            if route == "reset":
                collector.reset()
            elif route == "mode":
                collector.set_mode(None if data is None else _fault_from_json(data))
            elif route == "respond":
                if not isinstance(data, list):
                    raise ValueError("expected a JSON list of faults")
                collector.respond(*[_fault_from_json(item) for item in data])
            else:  # random
                if not isinstance(data, dict) or not isinstance(data.get("rates"), dict):
                    raise ValueError('expected {"seed": int, "rates": {kind: probability}}')
                seed = data.get("seed")
                if seed is not None and not isinstance(seed, int):
                    raise ValueError("seed must be an int")
                collector.set_random_faults(seed, data["rates"])
        except (ValueError, TypeError) as exc:
            raise _HTTPError(400, str(exc)) from None
        return {"status": "ok"}

    # -- I/O --------------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """Read the request body; None when it exceeds MAX_REQUEST_BYTES (then discarded).

        A body too large even to discard leaves the connection marked for closing.
        """
        encoding = self.headers.get("Transfer-Encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            if encoding.strip().lower() != "chunked":
                raise _HTTPError(400, f"unsupported Transfer-Encoding: {encoding}", close=True)
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            return b""
        try:
            length = int(length_header)
            if length < 0:
                raise ValueError(length_header)
        except ValueError:
            raise _HTTPError(400, "bad Content-Length", close=True) from None
        if length <= MAX_REQUEST_BYTES:
            body = self.rfile.read(length)
            if len(body) != length:
                raise _ClientGone()
            return body
        if length > _DISCARD_LIMIT:
            self.close_connection = True
            return None
        while length > 0:
            chunk = self.rfile.read(min(length, _READ_CHUNK))
            if not chunk:
                raise _ClientGone()
            length -= len(chunk)
        return None

    def _read_chunked(self) -> bytes | None:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(1024)
            if not line:
                raise _ClientGone()
            try:
                size = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _HTTPError(400, "bad chunked encoding", close=True) from None
            if size == 0:
                break
            total += size
            if total > _DISCARD_LIMIT:
                self.close_connection = True
                return None
            while size > 0:
                chunk = self.rfile.read(min(size, _READ_CHUNK))
                if not chunk:
                    raise _ClientGone()
                size -= len(chunk)
                if total <= MAX_REQUEST_BYTES:
                    parts.append(chunk)
            self.rfile.readline(1024)  # CRLF after the chunk data
        while True:  # trailers, up to the blank line
            line = self.rfile.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
        return b"".join(parts) if total <= MAX_REQUEST_BYTES else None

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = _JSON,
        extra: Sequence[tuple[str, str]] = (),
        drip: float | None = None,
    ) -> None:
        if status in _NO_BODY_STATUSES:
            body = b""
        lines = [
            f"HTTP/1.1 {status} {_PHRASES.get(status, 'Unknown')}",
            "Server: klime-devserver",
            "Date: " + _http_date(),
            "Content-Type: " + content_type,
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{key}: {value}" for key, value in extra)
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command != "HEAD":
            data += body
        if drip is None:
            self._busy = False  # answered: idle from the client's point of view
            self.wfile.write(data)
            return
        stop = self.server.collector._stop_event
        for start in range(0, len(data), DRIP_CHUNK_BYTES):
            if start and stop.wait(drip):
                self._abort()
                return
            if start + DRIP_CHUNK_BYTES >= len(data):
                self._busy = False
            self.wfile.write(data[start : start + DRIP_CHUNK_BYTES])

    def _abort(self) -> None:
        """Reset the connection (RST, thanks to SO_LINGER 0) without answering."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()  # drops the makefile() reference, so close() below is real
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def _recorded(
        self, body: bytes, status: int | None, fault: str | None, received_at: float
    ) -> RecordedRequest:
        return RecordedRequest(
            method=self.command,
            path=self.path,
            headers=dict(self.headers.items()),
            body=body,
            status=status,
            fault=fault,
            received_at=received_at,
        )


def _content_type(payload: bytes) -> str:
    return _JSON if payload[:1] in (b"{", b"[") else "text/plain; charset=utf-8"


def _request_summary(request: RecordedRequest) -> dict[str, Any]:
    headers = dict(request.headers)
    for key in headers:
        if key.lower() == "authorization":
            headers[key] = "Bearer ***"
    return {
        "method": request.method,
        "path": request.path,
        "status": request.status,
        "fault": request.fault,
        "body_bytes": len(request.body),
        "received_at": request.received_at,
        "headers": headers,
    }


# --------------------------------------------------------------------------------------------
# Collector
# --------------------------------------------------------------------------------------------


class Collector:
    """A Klime-compatible HTTP collector on a local port, with recording and fault injection.

    ``write_key=None`` accepts any non-empty Bearer token; otherwise the token must equal
    ``write_key`` (401 otherwise). ``echo`` receives one line per accepted event and per
    rejected or faulted request. ``seed`` is the seed :meth:`set_random_faults` uses when it is
    given none. Nothing is bound until :meth:`start`.

    All methods are thread-safe. :meth:`start` returns once the socket is listening;
    :meth:`stop`, :meth:`wait_for_events` and :meth:`wait_for_requests` block (stop briefly).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        write_key: str | None = None,
        echo: TextIO | None = None,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.write_key = write_key
        self.seed = seed
        self._echo_stream = echo
        self._echo_lock = threading.Lock()
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._events: list[Any] = []
        self._requests: list[RecordedRequest] = []
        self._script: deque[Fault] = deque()
        self._mode: Fault | None = None
        self._rng: random.Random | None = None
        self._random_table: list[tuple[float, Fault]] = []
        self._random_seed: int | None = None
        self._release = threading.Event()
        self._stop_event = threading.Event()
        self._stopping = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._handlers: dict[int, _Handler] = {}
        self._connections = 0

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> Collector:
        """Bind and serve in a daemon thread; return self. Blocks only while binding.

        Calling it again while running does nothing; a stopped collector cannot restart.
        """
        with self._lock:
            if self._stopping:
                raise RuntimeError("this Collector was stopped; create a new one")
            if self._server is not None:
                return self
            server_class = _Server6 if ":" in self.host else _Server
            server = server_class((self.host, self._requested_port), _Handler)
            server.collector = self
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="klime-devserver",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection. Idempotent; blocks ~50 ms at most.

        Black-holed, slow and dripping requests are released (their connections reset), the
        listening socket is closed and waiters in :meth:`wait_for_events` return. What was
        recorded stays readable.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            server, thread = self._server, self._thread
            handlers = list(self._handlers.values())
            self._stop_event.set()
            self._release.set()  # never replaced from now on: later blackholes return at once
            self._changed.notify_all()
        if server is not None:
            server.shutdown()
            server.server_close()
        for handler in handlers:
            _shutdown_socket(handler.connection)
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "not started"
        return f"<Collector {where} events={len(self._events)} requests={len(self._requests)}>"

    @property
    def port(self) -> int:
        """The bound port (raises RuntimeError before :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("Collector not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the endpoint to give the SDK (after :meth:`start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- what arrived -------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every accepted event, in arrival order (a new list; the dicts are the recorded ones)."""
        with self._lock:
            return list(self._events)

    def message_ids(self) -> list[str]:
        """The ``messageId`` of every accepted event, in arrival order, re-sends included."""
        with self._lock:
            return [str(event["messageId"]) for event in self._events]

    def requests(self) -> list[RecordedRequest]:
        """Every request that reached the handler, rejected and faulted ones included."""
        with self._lock:
            return list(self._requests)

    def wait_for_events(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` events were accepted; False after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._events) >= n or self._stopping, timeout)
            return len(self._events) >= n

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` requests were recorded; False after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: len(self._requests) >= n or self._stopping, timeout)
            return len(self._requests) >= n

    def connection_count(self) -> int:
        """How many TCP connections were accepted so far (to check keep-alive reuse)."""
        with self._lock:
            return self._connections

    def close_idle_connections(self) -> int:
        """Close every keep-alive connection not inside a request; return how many.

        Models a server or load balancer dropping idle connections: a client reusing one gets
        a stale-connection error. Best effort for a request arriving at that very moment.
        """
        with self._lock:
            idle = [h for h in self._handlers.values() if not h._busy]
        for handler in idle:
            _shutdown_socket(handler.connection)
        return len(idle)

    def reset(self) -> None:
        """Forget recorded events and requests and every fault; release black-holed requests."""
        with self._lock:
            self._events.clear()
            self._requests.clear()
            self._script.clear()
            self._mode = None
            self._rng = None
            self._random_table = []
            self._random_seed = None
            self._release_blackholes()

    # -- fault injection ----------------------------------------------------------------------

    def respond(self, *faults: Fault) -> None:
        """Queue scripted faults: each next ``POST /v1/batch`` consumes one, in order."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"expected Fault, got {type(fault).__name__}")
        with self._lock:
            self._script.extend(faults)

    def set_mode(self, fault: Fault | None) -> None:
        """Apply ``fault`` to every request while no scripted fault is queued; None = normal.

        Releases black-holed requests unless the new mode is itself a blackhole.
        """
        if fault is not None and not isinstance(fault, Fault):
            raise TypeError(f"expected Fault or None, got {type(fault).__name__}")
        with self._lock:
            self._mode = fault
            if fault is None or fault.kind != "blackhole":
                self._release_blackholes()

    def set_random_faults(self, seed: int | None, rates: Mapping[str, float]) -> None:
        """Give each request (with no scripted fault queued) a fault drawn at random.

        ``rates`` maps a fault spec (``"500"``, ``"429"``, ``"reset_before_read"``,
        ``"slow:0.2"``; see :meth:`Fault.parse`) to its probability; they must sum to at most 1.
        One ``random.Random(seed).random()`` draw per request picks the fault, so the same seed
        and request order give the same faults (``RecordedRequest.fault`` says which one).
        ``seed=None`` uses the constructor's ``seed``, or a fresh one: see :attr:`random_seed`.
        Empty ``rates`` turns random faults off.
        """
        table: list[tuple[float, Fault]] = []
        total = 0.0
        for spec, rate in rates.items():
            fault = Fault.parse(spec)
            rate = float(rate)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"rate for {spec!r} must be within 0..1, not {rate}")
            if rate:
                total += rate
                table.append((total, fault))
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates sum to {total}, more than 1")
        if seed is None:
            seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**32)
        with self._lock:
            self._random_table = table
            self._random_seed = seed if table else None
            self._rng = random.Random(seed) if table else None

    @property
    def random_seed(self) -> int | None:
        """The seed of the active random fault schedule (to replay a failing run), or None."""
        with self._lock:
            return self._random_seed

    # -- internals (called from handler threads) ----------------------------------------------

    def _next_fault(self) -> Fault | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._rng is not None:
                draw = self._rng.random()
                for bound, fault in self._random_table:
                    if draw < bound:
                        return fault
            return self._mode

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return False
        return self.write_key is None or token == self.write_key

    def _record(self, request: RecordedRequest, events: Sequence[Any] = ()) -> None:
        with self._lock:
            self._requests.append(request)
            if events:
                self._events.extend(events)
            self._changed.notify_all()

    def _blackhole_event(self) -> threading.Event:
        with self._lock:
            return self._release

    def _release_blackholes(self) -> None:
        # Caller holds self._lock. After stop() the set event stays, so nothing blocks again.
        if not self._stopping:
            self._release.set()
            self._release = threading.Event()

    def _opened(self, handler: _Handler) -> None:
        with self._lock:
            self._connections += 1
            self._handlers[id(handler)] = handler
            stopping = self._stopping
        if stopping:
            _shutdown_socket(handler.connection)

    def _closed(self, handler: _Handler) -> None:
        with self._lock:
            self._handlers.pop(id(handler), None)

    def _echo(self, text: str) -> None:
        stream = self._echo_stream
        if stream is None:
            return
        line = f"{_clock()}  {text}\n"
        with self._echo_lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass


def _shutdown_socket(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_rates(text: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        spec, sep, rate = item.rpartition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected SPEC=RATE, got {item!r}")
        try:
            rates[spec.strip()] = float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad rate in {item!r}") from None
    return rates


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m klime.devserver",
        description="A local Klime-compatible collector: prints every event that arrives. "
        "With '-- CMD ARGS...' it runs CMD with KLIME_ENDPOINT and KLIME_WRITE_KEY set, "
        "then prints a summary and exits with CMD's status.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port (8787; 0 picks a free one)")
    parser.add_argument("--write-key", help="accept only this write key (default: any)")
    parser.add_argument(
        "--fail",
        metavar="STATUS",
        help="answer every batch with STATUS (or a fault: 'reset_before_read', ...)",
    )
    parser.add_argument("--retry-after", metavar="VALUE", help="Retry-After for --fail")
    parser.add_argument("--delay", type=float, metavar="SECONDS", help="wait before answering")
    parser.add_argument(
        "--random-faults",
        type=_parse_rates,
        metavar="SPEC=RATE,...",
        help="random faults, e.g. '500=0.2,429=0.05,reset_before_read=0.02'",
    )
    parser.add_argument("--seed", type=int, help="seed for --random-faults")
    parser.add_argument("--quiet", action="store_true", help="do not print each event")
    return parser


def _mode_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Fault | None:
    try:
        if args.fail is None:
            if args.retry_after is not None:
                parser.error("--retry-after needs --fail")
            return Fault.slow(args.delay) if args.delay else None
        fault = Fault.parse(args.fail)
        if fault.kind == "status":
            return Fault.status_code(
                int(fault.status or 500), retry_after=args.retry_after, delay=args.delay or 0.0
            )
        if args.retry_after is not None:
            parser.error("--retry-after applies to a status only")
        if args.delay is not None:
            return Fault(fault.kind, delay=args.delay, failed_indices=fault.failed_indices)
        return fault
    except ValueError as exc:
        parser.error(str(exc))
    return None  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status. Blocks until Ctrl-C (or CMD exits)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    parser = _build_parser()
    args = parser.parse_args(arguments)
    mode = _mode_from_args(parser, args)

    collector = Collector(
        args.host,
        args.port,
        write_key=args.write_key,
        echo=None if args.quiet else sys.stdout,
        seed=args.seed,
    )
    collector.set_mode(mode)
    if args.random_faults:
        try:
            collector.set_random_faults(args.seed, args.random_faults)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        collector.start()
    except OSError as exc:
        print(f"klime devserver: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    print(f"klime devserver listening on {collector.url}", flush=True)
    if collector.random_seed is not None:
        print(f"random faults with seed {collector.random_seed}", flush=True)

    previous = _on_sigterm()
    try:
        if command:
            return _run_command(collector, command, args.write_key or "demo-write-key")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        collector.stop()
        print(_summary(collector.events()), flush=True)
        return 0
    finally:
        collector.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_command(collector: Collector, command: list[str], write_key: str) -> int:
    env = dict(os.environ)
    env["KLIME_ENDPOINT"] = collector.url
    env["KLIME_WRITE_KEY"] = write_key
    try:
        process = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"klime devserver: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    try:
        code = process.wait()
    except KeyboardInterrupt:
        try:
            code = process.wait(timeout=5)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.kill()
            code = process.wait()
    collector.stop()
    sys.stdout.flush()
    requests = collector.requests()
    rejected = sum(1 for r in requests if r.status != 200 or r.fault is not None)
    print(_summary(collector.events()), flush=True)
    if rejected:
        print(f"({len(requests)} requests, {rejected} rejected or faulted)", flush=True)
    return 128 - code if code < 0 else code


def _on_sigterm() -> Any:
    """Make SIGTERM behave like Ctrl-C in the main thread; return the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, _interrupt)
    except (ValueError, OSError):
        return None


if __name__ == "__main__":
    sys.exit(main())
