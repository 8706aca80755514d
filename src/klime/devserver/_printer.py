"""The printer: one readable line per arriving event or refused request, and the summary.

What ``klime listen`` and ``python -m klime.devserver`` show on the terminal::

    07:42:02.661  track     "Signup"  user=u1  {"plan": "pro"}
    07:42:02.700  -> 500 (fault)
    2 events arrived: 1 track, 1 identify, 0 group

Everything that arrived is untrusted text: control characters in it (C0 such as ESC and
newline, DEL, C1) are written as ``\\xNN`` (:func:`printable`), so an event cannot move the
cursor, retitle or clear the terminal, or forge lines; other Unicode is shown as it is.

Imports: the standard library and klime._terminal.
"""

from __future__ import annotations

import datetime as _dt
import json
import threading
import time
from typing import Any, Mapping, Sequence, TextIO

from .._terminal import printable

__all__ = ["Printer", "describe_event", "printable", "summary"]

_EVENT_TYPES = ("track", "identify", "group")

class Printer:
    """Writes timestamped lines to ``stream``, or nowhere when it is None.

    Thread-safe: a line is written whole (one lock). Never raises: a closed or broken
    stream loses the line.
    """

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """Whether lines go anywhere (callers skip building them when not)."""
        return self._stream is not None

    def line(self, text: str) -> None:
        """Write ``text`` (control characters escaped) after the wall-clock time, and flush."""
        stream = self._stream
        if stream is None:
            return
        line = f"{_clock()}  {printable(text)}\n"
        with self._lock:
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError):
                pass

    def batch(
        self, accepted: Sequence[Mapping[str, Any]], errors: Sequence[Mapping[str, Any]], fault: str | None
    ) -> None:
        """One line per accepted event, per failed event, and one for a fault applied."""
        if self._stream is None:
            return
        for event in accepted:
            self.line(describe_event(event))
        for error in errors:
            self.line(f"-> event #{error['index']} failed: {error['message']} ({error['code']})")
        if fault is not None:
            self.line(f"-> 200 ({fault} fault)")


def describe_event(event: Mapping[str, Any]) -> str:
    """``track     "Signup"  user=u1  {"plan": "pro"}``: kind, name or group, ids, payload."""
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
    when = _past_time(event.get("timestamp"))
    if when:
        parts.append(f"at={when}")
    return "  ".join(parts)


def _past_time(timestamp: Any) -> str:
    """The event's own time when it is not about now (history sent with ``timestamp=``,
    or a clock that is off): more than a minute away from this machine's clock. Pure."""
    if not isinstance(timestamp, str):
        return ""
    try:
        moment = _dt.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=_dt.UTC)
        away = abs((_dt.datetime.now(_dt.UTC) - moment).total_seconds())
    except (ValueError, OverflowError):
        return ""
    return printable(timestamp[:40]) if away > 60 else ""


def summary(events: Sequence[Mapping[str, Any]]) -> str:
    """``N events arrived: a track, b identify, c group``."""
    counts = {kind: 0 for kind in _EVENT_TYPES}
    for event in events:
        kind = event.get("type")
        if kind in counts:
            counts[str(kind)] += 1
    return (
        f"{len(events)} events arrived: {counts['track']} track, "
        f"{counts['identify']} identify, {counts['group']} group"
    )


def _clock() -> str:
    now = time.time()
    return time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"


def _short_json(value: Any, limit: int = 240) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
