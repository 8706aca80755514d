"""The event objects klime hands back to the application: ``on_error``'s list and
``SendError.events``.

An :class:`Event` is the wire ``dict`` of one event (camelCase keys, exactly as it was or
would have been sent: what klime 2 documents) that also reads as klime 1.x's ``Event``
dataclass: ``.type`` (an :class:`EventType`), ``.messageId``, ``.timestamp``, ``.event``,
``.userId``, ``.groupId``, ``.properties``, ``.traits``, ``.context`` and ``.to_dict()``.
So a handler written for either version works unchanged. :mod:`klime.types` is where the
public names live.

May import: nothing of klime (layer 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Mapping, Optional

__all__ = ["Event", "EventContext", "EventType", "LibraryInfo", "as_events"]


class EventType(str, Enum):  # noqa: UP042 -- klime 1.x's base classes, so str() reads the same
    """The three kinds of event (klime 1.x's enum; equal to the plain strings)."""

    TRACK = "track"
    IDENTIFY = "identify"
    GROUP = "group"


@dataclass
class LibraryInfo:
    """``context.library`` of an event: the SDK that sent it."""

    name: str
    version: str


@dataclass
class EventContext:
    """``context`` of an event."""

    library: Optional[LibraryInfo] = None


#: klime 1.x's Event fields, in its positional order, and the wire keys they read.
_FIELDS = ("type", "messageId", "timestamp", "event", "userId", "groupId", "properties", "traits", "context")


def _context_dict(context: Any) -> Any:
    if isinstance(context, EventContext):
        if context.library is None:
            return None
        return {"library": {"name": context.library.name, "version": context.library.version}}
    return context


class Event(Dict[str, Any]):
    """One event as its wire ``dict``, readable as klime 1.x's ``Event`` too.

    ``Event(wire_dict)`` wraps a decoded event; ``Event(type=..., messageId=...,
    timestamp=..., event=..., userId=..., ...)`` builds one as klime 1.x's dataclass did
    (handy in tests). Item access (``event["userId"]``) and attribute access
    (``event.userId``) read the same data; an absent key reads as None. Not thread-safe
    for writes (a plain dict).
    """

    __slots__ = ()

    if TYPE_CHECKING:  # properties made below, one per wire key
        messageId: Optional[str]
        timestamp: Optional[str]
        event: Optional[str]
        userId: Optional[str]
        groupId: Optional[str]
        properties: Optional[Dict[str, Any]]
        traits: Optional[Dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) == 1 and not kwargs and isinstance(args[0], Mapping):
            super().__init__(args[0])
            return
        if len(args) > len(_FIELDS):
            raise TypeError(f"Event() takes at most {len(_FIELDS)} positional arguments")
        values: Dict[str, Any] = dict(zip(_FIELDS, args))
        for name, value in kwargs.items():
            if name not in _FIELDS:
                raise TypeError(f"Event() got an unexpected keyword argument {name!r}")
            if name in values:
                raise TypeError(f"Event() got multiple values for argument {name!r}")
            values[name] = value
        wire: Dict[str, Any] = {}
        for name in _FIELDS:
            value = values.get(name)
            if name == "type" and isinstance(value, EventType):
                value = value.value
            elif name == "context":
                value = _context_dict(value)
            if value is not None:
                wire[name] = value
        super().__init__(wire)

    # klime 1.x's attributes, read from (and written to) the wire keys
    @property
    def type(self) -> Optional[EventType]:
        value = self.get("type")
        try:
            return EventType(value) if value is not None else None
        except ValueError:
            return value

    @type.setter
    def type(self, value: Any) -> None:
        self["type"] = value.value if isinstance(value, EventType) else value

    @property
    def context(self) -> Optional[EventContext]:
        raw = self.get("context")
        if not isinstance(raw, Mapping):
            return None
        library = raw.get("library")
        if isinstance(library, Mapping):
            return EventContext(LibraryInfo(str(library.get("name", "")), str(library.get("version", ""))))
        return EventContext()

    @context.setter
    def context(self, value: Any) -> None:
        self._put("context", _context_dict(value))

    def _put(self, key: str, value: Any) -> None:
        if value is None:
            self.pop(key, None)
        else:
            self[key] = value

    def to_dict(self) -> Dict[str, Any]:
        """A plain ``dict`` copy: the event as sent (klime 1.x's ``Event.to_dict()``)."""
        return dict(self)

    def __repr__(self) -> str:
        return f"Event({dict.__repr__(self)})"

    def __reduce__(self) -> Any:  # picklable as itself (multiprocessing, on_error in a pool)
        return (Event, (dict(self),))


def _plain_field(key: str) -> property:
    def getter(self: Event) -> Any:
        return self.get(key)

    def setter(self: Event, value: Any) -> None:
        self._put(key, value)

    return property(getter, setter, doc=f"The event's ``{key}`` (None when absent).")


for _key in ("messageId", "timestamp", "event", "userId", "groupId", "properties", "traits"):
    setattr(Event, _key, _plain_field(_key))
del _key


def as_events(events: Iterable[Any]) -> List[Event]:
    """``events`` as :class:`Event` objects: wire dicts are wrapped (no copy of nested
    values), Events are kept, klime 1.x dataclass-like objects with ``to_dict()`` are
    converted. Non-blocking."""
    out: List[Event] = []
    for item in events:
        if isinstance(item, Event):
            out.append(item)
        elif isinstance(item, Mapping):
            out.append(Event(item))
        elif callable(getattr(item, "to_dict", None)):
            out.append(Event(item.to_dict()))
        else:
            raise TypeError(f"an event must be a dict, not {type(item).__name__}")
    return out
