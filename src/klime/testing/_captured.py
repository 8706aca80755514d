"""What one :func:`~klime.testing.capture` recorded: :class:`CapturedEvents`, with its
finders (``tracked``, ``identified``, ``grouped``) and assertions (``assert_tracked``...), and
how expected values are matched against the captured wire dicts.

May import: the model (event decoding and JSON conversion, errors) and the standard library.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional, Union

from .._events import decode, to_json_value
from ..errors import KlimeError

__all__ = ["CapturedEvents"]

Event = Dict[str, Any]
Id = Union[str, int]


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def _expected_id(value: Id) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _expected_data(value: Optional[Mapping[str, Any]], what: str) -> Optional[Dict[str, Any]]:
    if value is None:
        return None
    try:
        data = to_json_value(dict(value), what)
    except KlimeError:
        return dict(value)  # compare as given; it could never have been tracked anyway
    return data  # type: ignore[no-any-return]


class _Query(NamedTuple):
    """What a finder or an assertion looks for: the wire values an event must have
    (``criteria``), and the keys its ``properties``/``traits`` (``data_key``) must include."""

    criteria: Dict[str, Any]
    data_key: str
    data: Optional[Dict[str, Any]]

    @classmethod
    def of(cls, kind: str, data: Optional[Mapping[str, Any]], **wanted: Any) -> _Query:
        """The query for events of ``kind``: each of ``wanted`` that is not None (ids as
        klime sends them), in the order given (the order a failure message names them)."""
        criteria: Dict[str, Any] = {"type": kind}
        for key, value in wanted.items():
            if value is not None:
                criteria[key] = value if key == "event" else _expected_id(value)
        data_key = "properties" if kind == "track" else "traits"
        return cls(criteria, data_key, _expected_data(data, data_key))

    def matches(self, event: Event) -> bool:
        for key, expected in self.criteria.items():
            if event.get(key) != expected:
                return False
        if self.data is not None:
            actual = event.get(self.data_key) or {}
            for key, expected in self.data.items():
                if key not in actual or actual[key] != expected:
                    return False
        return True

    def wanted(self) -> str:
        """The events looked for, in words: ``track "Signup" user_id='u1'``."""
        names = {"event": "", "userId": "user_id", "groupId": "group_id"}
        parts = [str(self.criteria["type"])]
        for key, value in self.criteria.items():
            if key == "type":
                continue
            parts.append(json.dumps(value) if key == "event" else f"{names[key]}={value!r}")
        if self.data is not None:
            parts.append(
                f"{self.data_key} including {json.dumps(self.data, ensure_ascii=False, sort_keys=True)}"
            )
        return " ".join(parts)


def _track(
    event: Optional[str],
    user_id: Optional[Id],
    group_id: Optional[Id],
    properties: Optional[Mapping[str, Any]],
) -> _Query:
    return _Query.of("track", properties, event=event, userId=user_id, groupId=group_id)


def _identify(user_id: Optional[Id], traits: Optional[Mapping[str, Any]]) -> _Query:
    return _Query.of("identify", traits, userId=user_id)


def _group(group_id: Optional[Id], user_id: Optional[Id], traits: Optional[Mapping[str, Any]]) -> _Query:
    return _Query.of("group", traits, groupId=group_id, userId=user_id)


def _describe(event: Event) -> str:
    kind = str(event.get("type"))
    parts = [kind]
    if kind == "track":
        parts.append(json.dumps(event.get("event"), ensure_ascii=False))
    elif kind == "group":
        parts.append(f"group_id={event.get('groupId')!r}")
    if kind == "identify" or "userId" in event:
        parts.append(f"user_id={event.get('userId')!r}")
    if kind == "track" and "groupId" in event:
        parts.append(f"group_id={event.get('groupId')!r}")
    data_key = "properties" if kind == "track" else "traits"
    if event.get(data_key):
        parts.append(f"{data_key}={json.dumps(event[data_key], ensure_ascii=False, sort_keys=True)}")
    return " ".join(parts)


_LISTED = 20


def _listing(events: List[Event]) -> str:
    if not events:
        return "no events were captured"
    lines = [f"{len(events)} events were captured:"]
    lines += [f"  {_describe(e)}" for e in events[-_LISTED:]]
    if len(events) > _LISTED:
        lines.insert(1, f"  ... {len(events) - _LISTED} earlier events not shown")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CapturedEvents
# ---------------------------------------------------------------------------------------------


class CapturedEvents:
    """The events recorded during one :func:`~klime.testing.capture`, oldest first. Thread-safe.

    ``events`` holds wire dicts. Finders (``tracked``, ``identified``, ``grouped``) return
    the matching events; ``assert_*`` raise :class:`AssertionError` listing what was captured
    when nothing matches, and return the most recent match. Criteria left as None match
    anything; ``properties``/``traits`` match when every key given is present with an equal
    value (other keys are allowed).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._raw: List[bytes] = []
        #: The capturing client installed as ``klime.client`` for the duration (None after).
        self.client: Any = None

    def _record(self, event: bytes) -> None:
        with self._lock:
            self._raw.append(event)

    # -- access ---------------------------------------------------------------------------

    @property
    def events(self) -> List[Event]:
        """A copy of every captured event (track, identify and group), as wire dicts."""
        return [decode(e) for e in self.raw]

    @property
    def raw(self) -> List[bytes]:
        """The captured events as the exact JSON bytes that would have been sent."""
        with self._lock:
            return list(self._raw)

    def __len__(self) -> int:
        with self._lock:
            return len(self._raw)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def __repr__(self) -> str:
        return f"<klime.testing.CapturedEvents {len(self)} events>"

    def clear(self) -> None:
        """Forget the events captured so far (capturing goes on)."""
        with self._lock:
            self._raw.clear()

    # -- finders --------------------------------------------------------------------------

    def tracked(
        self,
        event: Optional[str] = None,
        *,
        user_id: Optional[Id] = None,
        group_id: Optional[Id] = None,
        properties: Optional[Mapping[str, Any]] = None,
    ) -> List[Event]:
        """The track events matching every criterion given, oldest first."""
        return self._find(_track(event, user_id, group_id, properties))

    def identified(
        self, user_id: Optional[Id] = None, *, traits: Optional[Mapping[str, Any]] = None
    ) -> List[Event]:
        """The identify events matching every criterion given, oldest first."""
        return self._find(_identify(user_id, traits))

    def grouped(
        self,
        group_id: Optional[Id] = None,
        *,
        user_id: Optional[Id] = None,
        traits: Optional[Mapping[str, Any]] = None,
    ) -> List[Event]:
        """The group events matching every criterion given, oldest first."""
        return self._find(_group(group_id, user_id, traits))

    def _find(self, query: _Query) -> List[Event]:
        return [e for e in self.events if query.matches(e)]

    # -- assertions -----------------------------------------------------------------------

    def assert_tracked(
        self,
        event: Optional[str] = None,
        *,
        user_id: Optional[Id] = None,
        group_id: Optional[Id] = None,
        properties: Optional[Mapping[str, Any]] = None,
        count: Optional[int] = None,
    ) -> Event:
        """Assert that a matching track event was captured (exactly ``count`` of them, when
        given, which may be 0); return the most recent match (an empty dict for 0)."""
        __tracebackhide__ = True
        return self._assert(_track(event, user_id, group_id, properties), count)

    def assert_not_tracked(
        self,
        event: Optional[str] = None,
        *,
        user_id: Optional[Id] = None,
        group_id: Optional[Id] = None,
        properties: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Assert that no matching track event was captured."""
        __tracebackhide__ = True
        self._assert_none(_track(event, user_id, group_id, properties))

    def assert_identified(
        self,
        user_id: Optional[Id] = None,
        *,
        traits: Optional[Mapping[str, Any]] = None,
        count: Optional[int] = None,
    ) -> Event:
        """Assert that a matching identify event was captured (exactly ``count``, when
        given); return the most recent match (an empty dict for 0)."""
        __tracebackhide__ = True
        return self._assert(_identify(user_id, traits), count)

    def assert_grouped(
        self,
        group_id: Optional[Id] = None,
        *,
        user_id: Optional[Id] = None,
        traits: Optional[Mapping[str, Any]] = None,
        count: Optional[int] = None,
    ) -> Event:
        """Assert that a matching group event was captured (exactly ``count``, when given);
        return the most recent match (an empty dict for 0)."""
        __tracebackhide__ = True
        return self._assert(_group(group_id, user_id, traits), count)

    def _assert(self, query: _Query, count: Optional[int]) -> Event:
        __tracebackhide__ = True
        if count == 0:
            self._assert_none(query)
            return {}
        everything = self.events
        found = [e for e in everything if query.matches(e)]
        if count is not None and len(found) != count:
            raise AssertionError(
                f"expected {count} {query.wanted()} event(s), found {len(found)}\n{_listing(everything)}"
            )
        if not found:
            raise AssertionError(f"expected a {query.wanted()} event\n{_listing(everything)}")
        return found[-1]

    def _assert_none(self, query: _Query) -> None:
        __tracebackhide__ = True
        everything = self.events
        found = [e for e in everything if query.matches(e)]
        if found:
            raise AssertionError(
                f"expected no {query.wanted()} event, found {len(found)}\n{_listing(everything)}"
            )
