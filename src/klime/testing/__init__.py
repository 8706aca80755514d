"""Helpers for testing code that uses klime: capture events, assert on them, send nothing.

::

    from klime.testing import capture

    def test_signup():
        with capture() as events:
            myapp.signup("u1", plan="pro")      # calls klime somewhere inside
        events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"})

While :func:`capture` is active, every :class:`klime.Client` created gets a capturing
memory transport instead of the one it asked for, so nothing goes to the network, and its
``track``/``identify``/``group`` *and* ``*_sync`` calls are recorded. The default client
``klime.client`` (behind ``klime.track()`` and friends) is replaced by a capturing one for
the duration and put back afterwards. Clients created *before* the capture started keep
their real transport; create them inside the test (or use the default client).

A client created during a capture stays a test client: it never sends, and its later
events are recorded by whatever captures are active when they happen.

With pytest, the ``klime_events`` fixture (:mod:`klime.testing.pytest_plugin`, loaded
automatically when klime is installed) wraps each test that asks for it in :func:`capture`.

Events are the wire dicts a Klime server would receive (camelCase: ``type``, ``event``,
``userId``, ``groupId``, ``properties``, ``traits``, ``messageId``, ``timestamp``...).
Expected values given to the helpers are converted the way klime converts event data
(datetimes to ISO 8601, tuples to lists, int ids to strings...) before comparing, so you
can pass the same Python values you tracked. Everything here is thread-safe.
"""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from .. import transports as _transports
from .._deadline import Deadline
from .._events import decode, to_json_value
from ..errors import KlimeError, SendError
from ..senders.base import Sender, SendResult
from ..transports import MemoryTransport

__all__ = ["CapturedEvents", "MemoryTransport", "capture"]

Event = Dict[str, Any]
Id = Union[str, int]

#: Captures active right now, outermost first. Replaced (never mutated) under _state_lock.
_active: Tuple[CapturedEvents, ...] = ()
_state_lock = threading.RLock()


class _CapturingTransport(MemoryTransport):
    """A memory transport that also hands each event to every active capture.

    Used both as a client's transport and as its ``*_sync`` transport (``send``).
    """

    def submit(self, event: bytes) -> bool:
        if not super().submit(event):
            return False
        for sink in _active:
            sink._record(event)
        return True


class _NoNetworkSender(Sender):
    """The sender of the capturing default client: never used, refuses if it ever is."""

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        error = SendError("klime.testing: this client sends nothing")
        return SendResult(None, error, tuple(range(len(events))))


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def _expected_id(value: Id) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _expected_data(value: Mapping[str, Any], what: str) -> Dict[str, Any]:
    try:
        data = to_json_value(dict(value), what)
    except KlimeError:
        return dict(value)  # compare as given; it could never have been tracked anyway
    return data  # type: ignore[no-any-return]


def _matches(event: Event, criteria: Dict[str, Any], data_key: str, data: Optional[Dict[str, Any]]) -> bool:
    for key, expected in criteria.items():
        if event.get(key) != expected:
            return False
    if data is not None:
        actual = event.get(data_key) or {}
        for key, expected in data.items():
            if key not in actual or actual[key] != expected:
                return False
    return True


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


def _wanted(kind: str, criteria: Dict[str, Any], data_key: str, data: Optional[Dict[str, Any]]) -> str:
    names = {"event": "", "userId": "user_id", "groupId": "group_id"}
    parts = [kind]
    for key, value in criteria.items():
        if key == "type":
            continue
        parts.append(json.dumps(value) if key == "event" else f"{names[key]}={value!r}")
    if data is not None:
        parts.append(f"{data_key} including {json.dumps(data, ensure_ascii=False, sort_keys=True)}")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# CapturedEvents
# ---------------------------------------------------------------------------------------------


class CapturedEvents:
    """The events recorded during one :func:`capture`, oldest first. Thread-safe.

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
        with self._lock:
            raw = list(self._raw)
        return [decode(e) for e in raw]

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

    def _find(self, criteria: Dict[str, Any], data_key: str, data: Optional[Dict[str, Any]]) -> List[Event]:
        return [e for e in self.events if _matches(e, criteria, data_key, data)]

    @staticmethod
    def _track_criteria(
        event: Optional[str], user_id: Optional[Id], group_id: Optional[Id]
    ) -> Dict[str, Any]:
        criteria: Dict[str, Any] = {"type": "track"}
        if event is not None:
            criteria["event"] = event
        if user_id is not None:
            criteria["userId"] = _expected_id(user_id)
        if group_id is not None:
            criteria["groupId"] = _expected_id(group_id)
        return criteria

    @staticmethod
    def _traits_criteria(kind: str, user_id: Optional[Id], group_id: Optional[Id]) -> Dict[str, Any]:
        criteria: Dict[str, Any] = {"type": kind}
        if group_id is not None:
            criteria["groupId"] = _expected_id(group_id)
        if user_id is not None:
            criteria["userId"] = _expected_id(user_id)
        return criteria

    def tracked(
        self,
        event: Optional[str] = None,
        *,
        user_id: Optional[Id] = None,
        group_id: Optional[Id] = None,
        properties: Optional[Mapping[str, Any]] = None,
    ) -> List[Event]:
        """The track events matching every criterion given, oldest first."""
        data = None if properties is None else _expected_data(properties, "properties")
        return self._find(self._track_criteria(event, user_id, group_id), "properties", data)

    def identified(
        self, user_id: Optional[Id] = None, *, traits: Optional[Mapping[str, Any]] = None
    ) -> List[Event]:
        """The identify events matching every criterion given, oldest first."""
        data = None if traits is None else _expected_data(traits, "traits")
        return self._find(self._traits_criteria("identify", user_id, None), "traits", data)

    def grouped(
        self,
        group_id: Optional[Id] = None,
        *,
        user_id: Optional[Id] = None,
        traits: Optional[Mapping[str, Any]] = None,
    ) -> List[Event]:
        """The group events matching every criterion given, oldest first."""
        data = None if traits is None else _expected_data(traits, "traits")
        return self._find(self._traits_criteria("group", user_id, group_id), "traits", data)

    # -- assertions -----------------------------------------------------------------------

    def _assert(
        self,
        criteria: Dict[str, Any],
        data_key: str,
        data: Optional[Dict[str, Any]],
        count: Optional[int],
    ) -> Event:
        __tracebackhide__ = True
        everything = self.events
        found = [e for e in everything if _matches(e, criteria, data_key, data)]
        wanted = _wanted(str(criteria["type"]), criteria, data_key, data)
        if count is not None and len(found) != count:
            raise AssertionError(
                f"expected {count} {wanted} event(s), found {len(found)}\n{_listing(everything)}"
            )
        if not found:
            raise AssertionError(f"expected a {wanted} event\n{_listing(everything)}")
        return found[-1]

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
        data = None if properties is None else _expected_data(properties, "properties")
        criteria = self._track_criteria(event, user_id, group_id)
        if count == 0:
            self._assert_none(criteria, "properties", data)
            return {}
        return self._assert(criteria, "properties", data, count)

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
        data = None if properties is None else _expected_data(properties, "properties")
        self._assert_none(self._track_criteria(event, user_id, group_id), "properties", data)

    def _assert_none(self, criteria: Dict[str, Any], data_key: str, data: Optional[Dict[str, Any]]) -> None:
        __tracebackhide__ = True
        everything = self.events
        found = [e for e in everything if _matches(e, criteria, data_key, data)]
        if found:
            wanted = _wanted(str(criteria["type"]), criteria, data_key, data)
            raise AssertionError(f"expected no {wanted} event, found {len(found)}\n{_listing(everything)}")

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
        data = None if traits is None else _expected_data(traits, "traits")
        criteria = self._traits_criteria("identify", user_id, None)
        if count == 0:
            self._assert_none(criteria, "traits", data)
            return {}
        return self._assert(criteria, "traits", data, count)

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
        data = None if traits is None else _expected_data(traits, "traits")
        criteria = self._traits_criteria("group", user_id, group_id)
        if count == 0:
            self._assert_none(criteria, "traits", data)
            return {}
        return self._assert(criteria, "traits", data, count)


# ---------------------------------------------------------------------------------------------
# capture()
# ---------------------------------------------------------------------------------------------


def _start(captured: CapturedEvents) -> None:
    global _active
    with _state_lock:
        if not _active:
            # every Client created from now on records instead of sending; its ``*_sync``
            # calls go to the same memory transport (MemoryTransport.sync_transport)
            _transports.set_transport_override(_CapturingTransport)
        _active = (*_active, captured)


def _stop(captured: CapturedEvents) -> None:
    global _active
    with _state_lock:
        _active = tuple(c for c in _active if c is not captured)
        if not _active:
            _transports.set_transport_override(None)


@contextlib.contextmanager
def capture() -> Iterator[CapturedEvents]:
    """Record, instead of sending, every event of every Client created inside the block.

    Also swaps the default client ``klime.client`` for a capturing one (restored on exit),
    so ``klime.track()`` and friends are captured without a write key. Captures nest: an
    event is recorded by every capture active when it is made. Not blocking; thread-safe,
    but the capture is process-wide (events from every thread are recorded).
    """
    import klime

    captured = CapturedEvents()
    _start(captured)
    previous = klime.client
    default = None
    try:
        default = klime.Client(sender=_NoNetworkSender())
        captured.client = default
        klime.client = default
        yield captured
    finally:
        klime.client = previous  # also when the code under test replaced it meanwhile
        _stop(captured)
        if default is not None:
            default.shutdown(timeout=0)
        captured.client = None
