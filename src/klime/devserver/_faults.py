"""The fault scripts: how the collector misbehaves on purpose, request by request.

:class:`Fault` is one scripted misbehaviour (a status, a partial failure, a reset, a black
hole, a slow or dripping answer), with its short spec form (``Fault.parse("slow:0.5")``) and
its JSON form (for ``POST /_klime/mode``). :class:`FaultSchedule` decides which fault the next
``POST /v1/batch`` gets: scripted faults first, then a seeded random draw, then the standing
mode; it also owns the gate black-holed requests wait on.

Imports: the standard library only. Nothing here touches a socket; the HTTP layer
(:mod:`klime.devserver._http`) carries the faults out.
"""

from __future__ import annotations

import math
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Mapping

__all__ = [
    "DEFAULT_DRIP_DELAY",
    "DEFAULT_SLOW_DELAY",
    "DRIP_CHUNK_BYTES",
    "FAULT_KINDS",
    "Fault",
    "FaultSchedule",
    "fault_from_json",
    "random_table",
]

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


def fault_from_json(data: Any) -> Fault:
    """A fault from its JSON form: a spec string (``"503"``) or an object (:meth:`Fault.from_dict`)."""
    if isinstance(data, str):
        return Fault.parse(data)
    if isinstance(data, Mapping):
        return Fault.from_dict(data)
    raise ValueError("a fault is a JSON object or a spec string")


def random_table(rates: Mapping[str, float]) -> list[tuple[float, Fault]]:
    """Turn ``{spec: probability}`` into a table of ``(cumulative bound, fault)`` rows.

    Raises :class:`ValueError` for a bad spec, a rate outside 0..1 or rates summing to more
    than 1. Rates of 0 are left out, so empty (or all-zero) ``rates`` give an empty table.
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
    return table


class FaultSchedule:
    """Which fault each next ``POST /v1/batch`` gets, and the gate black holes wait on.

    :meth:`next` takes the oldest scripted fault, else draws from the random table (one
    ``random.Random(seed).random()`` per request, so a seed replays), else returns the
    standing mode (None: handle normally). Thread-safe (one lock); nothing blocks except
    waiting on the gate :meth:`blackhole_gate` returns.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._script: deque[Fault] = deque()
        self._mode: Fault | None = None
        self._rng: random.Random | None = None
        self._table: list[tuple[float, Fault]] = []
        self._seed: int | None = None
        self._gate = threading.Event()
        self._final = False

    def push(self, *faults: Fault) -> None:
        """Queue ``faults`` in order (raises TypeError for anything but a :class:`Fault`)."""
        for fault in faults:
            if not isinstance(fault, Fault):
                raise TypeError(f"expected Fault, got {type(fault).__name__}")
        with self._lock:
            self._script.extend(faults)

    def set_mode(self, fault: Fault | None) -> None:
        """Make ``fault`` the standing mode; releases black holes unless it is one itself."""
        if fault is not None and not isinstance(fault, Fault):
            raise TypeError(f"expected Fault or None, got {type(fault).__name__}")
        with self._lock:
            self._mode = fault
            if fault is None or fault.kind != "blackhole":
                self._release()

    def set_random(self, seed: int, table: list[tuple[float, Fault]]) -> None:
        """Draw from ``table`` (see :func:`random_table`) with ``seed``; an empty one turns it off."""
        with self._lock:
            self._table = table
            self._seed = seed if table else None
            self._rng = random.Random(seed) if table else None

    @property
    def random_seed(self) -> int | None:
        """The seed of the active random schedule, or None."""
        with self._lock:
            return self._seed

    def next(self) -> Fault | None:
        """The fault for the next request (consumes a scripted one), or None."""
        with self._lock:
            if self._script:
                return self._script.popleft()
            if self._rng is not None:
                draw = self._rng.random()
                for bound, fault in self._table:
                    if draw < bound:
                        return fault
            return self._mode

    def clear(self) -> None:
        """Forget the script, the mode and the random schedule; release black holes."""
        with self._lock:
            self._script.clear()
            self._mode = None
            self._rng = None
            self._table = []
            self._seed = None
            self._release()

    def blackhole_gate(self) -> threading.Event:
        """The event a black-holed request waits on; it is set when black holes are released."""
        with self._lock:
            return self._gate

    def release_forever(self) -> None:
        """Release every black hole, now and later (the collector is stopping)."""
        with self._lock:
            self._final = True
            self._gate.set()

    def _release(self) -> None:
        # Caller holds self._lock. After release_forever() the gate stays set.
        if not self._final:
            self._gate.set()
            self._gate = threading.Event()
