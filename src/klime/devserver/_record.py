"""The record of arrivals: what reached the collector, and when, for tests and ``klime listen``.

:class:`RecordedRequest` is one request as it arrived (its timing included);
:class:`Arrivals` keeps them and the accepted events in arrival order, lets a test wait
for them, and counts the batch requests being handled at once (:attr:`Arrivals.in_flight`
and its peak). :class:`Visit` is the handle the HTTP layer holds while it handles one
request. :func:`redacted` is the JSON form ``GET /_klime/requests`` serves.

Imports: the standard library only.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["Arrivals", "RecordedRequest", "Visit", "redacted"]


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request that reached the collector (control endpoints excepted).

    ``status`` is the status answered, or None when the connection was reset or black-holed;
    ``fault`` is the :attr:`Fault.name` applied, None when the request was handled normally.
    ``headers`` hold the request headers as sent, the write key included: keep them
    in-process (the control endpoint redacts it).

    Timing, all :func:`time.monotonic` seconds: ``started_at`` when the request line and
    headers had been read; ``received_at`` when the body had been (or when the request
    line had been, for a body never read); ``answered_at`` when the collector was done with
    the request: the last byte of its answer handed to the socket, or the connection reset
    (then ``status`` is None). ``answered_at`` is None while the answer is still held (a
    ``slow`` fault, a delayed status, a black hole): the collector replaces the recorded
    entry once it is done, so read :meth:`Collector.requests` again to see it. Both are None
    only on a RecordedRequest built by hand.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    status: int | None
    fault: str | None
    received_at: float
    started_at: float | None = None
    answered_at: float | None = None

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


def redacted(request: RecordedRequest) -> dict[str, Any]:
    """The JSON summary of ``request`` served by ``GET /_klime/requests``: no body, no key."""
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
        "started_at": request.started_at,
        "received_at": request.received_at,
        "answered_at": request.answered_at,
        "headers": headers,
    }


class Arrivals:
    """Recorded requests and accepted events, in arrival order, and the in-flight count.

    Thread-safe (one lock). The ``wait_for_*`` methods block up to their ``timeout``
    (seconds) and return early, with the condition's current truth, once :meth:`close`
    was called.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._events: list[Any] = []
        self._requests: list[RecordedRequest] = []
        self._generation = 0  # bumped by clear(): a Visit of before then no longer edits the list
        self._in_flight = 0
        self._peak = 0
        self._closed = False

    # -- read --------------------------------------------------------------------------------

    def events(self) -> list[Any]:
        """Every accepted event, in arrival order (a new list; the dicts are the recorded ones)."""
        with self._lock:
            return list(self._events)

    def requests(self) -> list[RecordedRequest]:
        """Every recorded request, in arrival order (a new list)."""
        with self._lock:
            return list(self._requests)

    def counts(self) -> tuple[int, int]:
        """``(events, requests)`` recorded so far."""
        with self._lock:
            return len(self._events), len(self._requests)

    @property
    def in_flight(self) -> int:
        """How many batch requests are being handled right now."""
        with self._lock:
            return self._in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most batch requests handled at once since creation or :meth:`clear`."""
        with self._lock:
            return self._peak

    def wait_for_events(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` events were accepted; False after ``timeout`` seconds."""
        return self._wait(lambda: len(self._events) >= n, timeout)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` requests were recorded; False after ``timeout`` seconds."""
        return self._wait(lambda: len(self._requests) >= n, timeout)

    def wait_for_in_flight(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` batch requests are handled at once; False after ``timeout``."""
        return self._wait(lambda: self._in_flight >= n, timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until no batch request is in flight (:meth:`close` notwithstanding);
        False after ``timeout`` seconds."""
        with self._changed:
            return self._changed.wait_for(lambda: self._in_flight == 0, timeout)

    def _wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            self._changed.wait_for(lambda: condition() or self._closed, timeout)
            return condition()

    # -- write (the HTTP layer) ----------------------------------------------------------------

    def visit(self, *, batch: bool) -> Visit:
        """Start handling one request; a ``batch`` one counts in flight until it is done."""
        if not batch:
            return Visit(self, time.monotonic(), False)
        with self._lock:  # the clock is read under the lock, so times and counts agree
            started = time.monotonic()
            self._in_flight += 1
            self._peak = max(self._peak, self._in_flight)
            self._changed.notify_all()
        return Visit(self, started, True)

    def _append(self, request: RecordedRequest, events: Sequence[Any]) -> tuple[int, int]:
        with self._lock:
            self._requests.append(request)
            if events:
                self._events.extend(events)
            self._changed.notify_all()
            return self._generation, len(self._requests) - 1

    def _done(self, slot: tuple[int, int] | None, counted: bool) -> None:
        with self._lock:
            at = time.monotonic()
            if slot is not None and slot[0] == self._generation:
                index = slot[1]
                self._requests[index] = dataclasses.replace(self._requests[index], answered_at=at)
            if counted:
                self._in_flight -= 1
            self._changed.notify_all()

    def clear(self) -> None:
        """Forget what was recorded; the peak restarts from the requests still in flight."""
        with self._lock:
            self._events.clear()
            self._requests.clear()
            self._generation += 1
            self._peak = self._in_flight

    def close(self) -> None:
        """Wake every waiter, now and later (the collector is stopping)."""
        with self._lock:
            self._closed = True
            self._changed.notify_all()


class Visit:
    """One request being handled: records it once and is marked done once.

    Used by one handler thread at a time; :meth:`done` is idempotent, so the HTTP layer can
    call it where the answer is handed over and again, as a safety net, when it leaves.
    """

    __slots__ = ("_arrivals", "_counted", "_finished", "_slot", "started_at")

    def __init__(self, arrivals: Arrivals, started_at: float, counted: bool) -> None:
        self._arrivals = arrivals
        self._counted = counted
        self._finished = False
        self._slot: tuple[int, int] | None = None
        self.started_at = started_at

    def record(self, request: RecordedRequest, events: Sequence[Any] = ()) -> None:
        """Record ``request`` (and the events it got accepted) in arrival order."""
        self._slot = self._arrivals._append(request, events)

    def done(self) -> None:
        """The answer was handed to the socket, or the connection reset: stamp ``answered_at``."""
        if self._finished:
            return
        self._finished = True
        self._arrivals._done(self._slot, self._counted)
