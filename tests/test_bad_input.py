"""The bad-input table: every case is its own test, run through a real background client.

Each case gets a clear error (``ValidationError`` at the call, nothing queued) or a
documented conversion (DESIGN.md section 2), and never a dead sender thread or a lost
neighbour: an event tracked right before and one right after the bad call both arrive at
the collector, the ``klime-sender`` thread is still alive and the books balance.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import logging
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional, Tuple, Type, Union

import pytest

import klime
from conftest import WRITE_KEY, Recorder, conserved, wait_until
from klime import SendError, ValidationError
from klime._config import MAX_EVENT_BYTES
from klime._events import decode, encode_group, encode_identify, encode_track
from klime.devserver import Collector, Fault

SETTLE = 10.0
SLACK = 1.5

# ---------------------------------------------------------------------------------------
# the harness


class Neighbours:
    """A background client, plus the before/after check every case runs."""

    def __init__(self, client: klime.Client, collector: Collector) -> None:
        self.client = client
        self.collector = collector
        self.count = 0

    def track(self, tag: str) -> str:
        self.count += 1
        name = f"neighbour-{tag}-{self.count}"
        self.client.track(name, {"neighbour": True}, user_id="neighbour")
        return name

    def around(
        self, call: Callable[[], Any], *, separate: bool = False
    ) -> Tuple[Optional[BaseException], List[Dict[str, Any]]]:
        """Track a neighbour, make the call, track another; return (error, events arrived
        in between), after checking both neighbours arrived and the sender is alive.

        ``separate`` sends the first neighbour on its own before the call (for calls that
        script a fault for the next request)."""
        arrived_before = len(self.collector.events())
        before = self.track("before")
        if separate:
            assert self.client.flush(timeout=SETTLE).unsent == 0
        error: Optional[BaseException] = None
        try:
            call()
        except Exception as exc:
            error = exc
        after = self.track("after")
        result = self.client.flush(timeout=SETTLE)
        assert result.unsent == 0, result
        events = self.collector.events()[arrived_before:]
        names = [e.get("event") for e in events]
        assert before in names and after in names, names
        assert names.index(before) < names.index(after)
        self.assert_healthy()
        return error, [e for e in events if not str(e.get("event", "")).startswith("neighbour-")]

    def assert_healthy(self) -> None:
        thread = self.client.transport._thread  # type: ignore[attr-defined]
        assert isinstance(thread, threading.Thread) and thread.is_alive(), "the sender thread died"
        stats = self.client.stats()
        assert conserved(stats) and stats["queued"] == 0, stats


@pytest.fixture
def harness(make_client: Callable[..., klime.Client], collector: Collector) -> Neighbours:
    # a long interval: only flush() or a full batch sends, so each case is one clean step
    client = make_client(flush_interval=60_000, max_batch_size=50)
    return Neighbours(client, collector)


# ---------------------------------------------------------------------------------------
# values used by the table


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class StrRaises:
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __repr__(self) -> str:
        raise RuntimeError("__repr__ is broken")


class KeyStrRaises:
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")

    def __hash__(self) -> int:
        return 1


class IdStrRaises(str):
    def __str__(self) -> str:
        raise RuntimeError("__str__ is broken")


class DumpRaises:
    def model_dump(self) -> Dict[str, Any]:
        raise RuntimeError("model_dump is broken")


def nested(depth: int, leaf: Any = 1, key: Any = "a") -> Dict[Any, Any]:
    root: Dict[Any, Any] = {}
    cur = root
    for _ in range(depth - 1):
        cur[key] = {}
        cur = cur[key]
    cur[key] = leaf
    return root


def nested_list(depth: int) -> List[Any]:
    root: List[Any] = []
    cur = root
    for _ in range(depth - 1):
        inner: List[Any] = []
        cur.append(inner)
        cur = inner
    return root


def cyclic_dict() -> Dict[str, Any]:
    d: Dict[str, Any] = {"a": 1}
    d["self"] = {"back": d}
    return d


def cyclic_list() -> Dict[str, Any]:
    items: List[Any] = [1]
    items.append(items)
    return {"items": items}


def sized_properties(total: int) -> Dict[str, str]:
    """Properties that make a track event (as tracked below) exactly ``total`` bytes."""
    from klime._events import encode_track

    base = len(encode_track("sized", {"p": ""}, "u", None))
    return {"p": "a" * (total - base)}


# ---------------------------------------------------------------------------------------
# the table: (id, call on a client, expected) where expected is
#   (ValidationError, "fragment of the message")  -> raised at the call, nothing queued
#   (TypeError, None)                             -> Python's own argument error
#   a function(event) -> None                     -> the documented conversion arrived

Check = Callable[[Dict[str, Any]], None]
Expected = Union[Tuple[Type[BaseException], Optional[str]], Check]


def props(expected: Dict[str, Any]) -> Check:
    def check(event: Dict[str, Any]) -> None:
        assert event["properties"] == expected, event["properties"]

    return check


def fields_are(**expected: Any) -> Check:
    def check(event: Dict[str, Any]) -> None:
        assert {k: event.get(k) for k in expected} == expected, event

    return check


def no_properties(event: Dict[str, Any]) -> None:
    assert "properties" not in event, event


def size_is(n: int) -> Check:
    def check(event: Dict[str, Any]) -> None:
        import json

        assert len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()) == n

    return check


VE = ValidationError
NAN = float("nan")
INF = float("inf")

CASES: List[Tuple[str, Callable[[klime.Client], Any], Expected]] = [
    # wrong types for every argument
    ("track-event-int", lambda c: c.track(123, user_id="u"), (VE, "event name")),
    ("track-event-none", lambda c: c.track(None, user_id="u"), (VE, "event name")),
    ("track-event-empty", lambda c: c.track("", user_id="u"), (VE, "event name")),
    ("track-event-bytes", lambda c: c.track(b"Signup", user_id="u"), (VE, "event name")),
    ("track-properties-list", lambda c: c.track("E", [("a", 1)], user_id="u"), (VE, "must be a dict")),
    ("track-properties-str", lambda c: c.track("E", "a=1", user_id="u"), (VE, "properties must be a dict")),
    ("track-properties-int", lambda c: c.track("E", 5, user_id="u"), (VE, "properties must be a dict")),
    ("track-user-id-float", lambda c: c.track("E", user_id=1.5), (VE, "user_id")),
    ("track-user-id-bool", lambda c: c.track("E", user_id=True), (VE, "user_id")),
    ("track-user-id-bytes", lambda c: c.track("E", user_id=b"u"), (VE, "user_id")),
    ("track-user-id-empty", lambda c: c.track("E", user_id=""), (VE, "user_id")),
    ("track-group-id-list", lambda c: c.track("E", group_id=["g"]), (VE, "group_id")),
    ("track-group-id-empty", lambda c: c.track("E", user_id="u", group_id=""), (VE, "group_id")),
    ("track-anonymous", lambda c: c.track("E", {"a": 1}), (VE, "user_id or a group_id")),
    ("track-unknown-keyword", lambda c: c.track("E", user="u"), (TypeError, None)),
    ("identify-user-id-none", lambda c: c.identify(None), (VE, "user_id is required")),
    ("identify-user-id-dict", lambda c: c.identify({"id": 1}), (VE, "user_id")),
    ("identify-traits-int", lambda c: c.identify("u", 5), (VE, "traits must be a dict")),
    ("group-group-id-empty", lambda c: c.group(""), (VE, "group_id")),
    ("group-group-id-float", lambda c: c.group(2.5), (VE, "group_id")),
    ("group-user-id-bytes", lambda c: c.group("g", user_id=b"u"), (VE, "user_id")),
    ("group-traits-list", lambda c: c.group("g", ["t"]), (VE, "traits must be a dict")),
    # documented conversions
    ("int-ids-become-strings", lambda c: c.track("E", user_id=42, group_id=7), fields_are(userId="42", groupId="7")),  # noqa: E501
    (
        "non-str-keys-are-stringified",
        lambda c: c.track(
            "E", {5: "a", None: "b", 2.5: "c", True: "d", (1, 2): "e", Color.RED: "f"}, user_id="u"
        ),
        props({"5": "a", "null": "b", "2.5": "c", "true": "d", "(1, 2)": "e", "Color.RED": "f"}),
    ),
    (
        "rich-values-are-converted",
        lambda c: c.track(
            "E",
            {
                "when": dt.datetime(2024, 1, 2, 3, 4, 5),
                "day": dt.date(2024, 1, 2),
                "price": decimal.Decimal("9.50"),
                "id": uuid.UUID(int=1),
                "color": Color.RED,
                "tags": {"x"},
                "pair": (1, 2),
                "point": Point(1, 2),
            },
            user_id="u",
        ),
        props(
            {
                "when": "2024-01-02T03:04:05Z",
                "day": "2024-01-02",
                "price": 9.5,
                "id": "00000000-0000-0000-0000-000000000001",
                "color": "red",
                "tags": ["x"],
                "pair": [1, 2],
                "point": {"x": 1, "y": 2},
            }
        ),
    ),
    ("empty-properties-are-omitted", lambda c: c.track("E", {}, user_id="u"), no_properties),
    # sizes
    ("huge-string-10MB", lambda c: c.track("E", {"s": "x" * 10_000_000}, user_id="u"), (VE, "limit")),
    ("event-exactly-200KiB", lambda c: c.track("sized", sized_properties(MAX_EVENT_BYTES), user_id="u"), size_is(MAX_EVENT_BYTES)),  # noqa: E501
    ("event-200KiB-plus-1", lambda c: c.track("sized", sized_properties(MAX_EVENT_BYTES + 1), user_id="u"), (VE, "204,801 bytes")),  # noqa: E501
    ("huge-event-name", lambda c: c.track("E" * (MAX_EVENT_BYTES + 1), user_id="u"), (VE, "limit")),
    # structure
    ("deeply-nested-10000", lambda c: c.track("E", nested(10_000), user_id="u"), (VE, "nested")),
    ("deeply-nested-list-10000", lambda c: c.track("E", {"l": nested_list(10_000)}, user_id="u"), (VE, "nested")),  # noqa: E501
    ("cyclic-dict", lambda c: c.track("E", cyclic_dict(), user_id="u"), (VE, "cycle")),
    ("cyclic-list", lambda c: c.track("E", cyclic_list(), user_id="u"), (VE, "cycle")),
    ("cyclic-traits", lambda c: c.identify("u", cyclic_dict()), (VE, "cycle")),
    # numbers
    ("nan", lambda c: c.track("E", {"n": NAN}, user_id="u"), (VE, "NaN")),
    ("infinity", lambda c: c.track("E", {"n": INF}, user_id="u"), (VE, "NaN and Infinity")),
    ("minus-infinity-in-a-list", lambda c: c.track("E", {"n": [1, -INF]}, user_id="u"), (VE, "Infinity")),
    ("decimal-nan", lambda c: c.track("E", {"d": decimal.Decimal("NaN")}, user_id="u"), (VE, "Decimal")),
    ("decimal-inf", lambda c: c.track("E", {"d": decimal.Decimal("-inf")}, user_id="u"), (VE, "Decimal")),
    # bytes and unknown objects
    ("bytes-value", lambda c: c.track("E", {"b": b"\x00\xff"}, user_id="u"), (VE, "bytes")),
    ("bytearray-value", lambda c: c.track("E", {"b": bytearray(b"x")}, user_id="u"), (VE, "bytearray")),
    ("object-value", lambda c: c.track("E", {"o": object()}, user_id="u"), (VE, "object")),
    ("generator-value", lambda c: c.track("E", {"g": (i for i in range(3))}, user_id="u"), (VE, "generator")),
    ("function-value", lambda c: c.track("E", {"f": len}, user_id="u"), (VE, "cannot turn into JSON")),
    ("value-whose-str-raises", lambda c: c.track("E", {"o": StrRaises()}, user_id="u"), (VE, "StrRaises")),
    ("key-whose-str-raises", lambda c: c.track("E", {KeyStrRaises(): 1}, user_id="u"), (VE, "key")),
    ("event-name-whose-repr-raises", lambda c: c.track(StrRaises(), user_id="u"), (VE, "event name")),
    # text that is not Unicode
    ("lone-surrogate-value", lambda c: c.track("E", {"s": "a\ud800b"}, user_id="u"), (VE, "surrogate")),
    ("lone-surrogate-key", lambda c: c.track("E", {"\udfff": 1}, user_id="u"), (VE, "surrogate")),
    ("lone-surrogate-event-name", lambda c: c.track("E\ud834", user_id="u"), (VE, "surrogate")),
    ("lone-surrogate-user-id", lambda c: c.identify("u\udc00"), (VE, "surrogate")),
    ("lone-surrogate-group-id", lambda c: c.group("\ud800"), (VE, "surrogate")),
]


@pytest.mark.parametrize("call, expected", [pytest.param(c, e, id=i) for i, c, e in CASES])
def test_bad_input(harness: Neighbours, call: Callable[[klime.Client], Any], expected: Expected) -> None:
    tracked = harness.client.stats()["tracked"]
    error, arrived = harness.around(lambda: call(harness.client))
    if isinstance(expected, tuple):
        kind, fragment = expected
        assert isinstance(error, kind), repr(error)
        if fragment is not None:
            assert fragment in str(error), str(error)
        assert arrived == [], "nothing of a refused call may be queued or sent"
        assert harness.client.stats()["tracked"] == tracked + 2  # the two neighbours only
    else:
        assert error is None, repr(error)
        (event,) = arrived
        expected(event)


def test_the_table_has_at_least_25_cases():
    assert len(CASES) >= 25 and len({i for i, _, _ in CASES}) == len(CASES)


# ---------------------------------------------------------------------------------------
# conversion errors of user objects (they used to escape as their own exceptions)

FOREIGN = [
    ("model-dump-raises", lambda c: c.track("E", {"m": DumpRaises()}, user_id="u")),
    ("int-too-large-to-print-in-properties", lambda c: c.track("E", {"n": 10**5000}, user_id="u")),
    ("int-too-large-to-print-as-user-id", lambda c: c.identify(10**5000)),
]


def test_str_subclasses_are_used_by_value_not_by_their_str(harness: Neighbours) -> None:
    """A str subclass's own __str__ is never called: its text is the value (documented)."""
    error, arrived = harness.around(lambda: harness.client.track(IdStrRaises("E"), user_id=IdStrRaises("u")))
    assert error is None and len(arrived) == 1
    assert arrived[0]["event"] == "E" and arrived[0]["userId"] == "u"


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in FOREIGN])
def test_conversion_errors_of_user_objects_are_validation_errors(
    harness: Neighbours, call: Callable[[klime.Client], Any]
) -> None:
    error, arrived = harness.around(lambda: call(harness.client))
    assert isinstance(error, ValidationError), repr(error)
    assert arrived == []


@pytest.mark.parametrize("call", [pytest.param(c, id=i) for i, c in FOREIGN])
def test_conversion_errors_of_user_objects_never_hurt_the_neighbours(
    harness: Neighbours, call: Callable[[klime.Client], Any]
) -> None:
    """Whatever error escapes today, a refused call queues nothing and the neighbours
    arrive. (On a Python without the int-to-str digit limit a huge int is simply sent.)"""
    tracked = harness.client.stats()["tracked"]
    error, arrived = harness.around(lambda: call(harness.client))
    if error is None:
        assert len(arrived) == 1 and harness.client.stats()["tracked"] == tracked + 3
    else:
        assert arrived == [] and harness.client.stats()["tracked"] == tracked + 2


# ---------------------------------------------------------------------------------------
# hostile user objects (issue 20): whatever they do, only a ValidationError naming the path
# comes out of the call (BaseExceptions that are not Exceptions may pass: not tested here)


class Boom(Exception):
    """An exception whose own message cannot be printed either."""

    def __str__(self) -> str:
        raise RuntimeError("__str__ of the exception is broken too")


class ReprRaisesStr(str):
    def __repr__(self) -> str:
        raise Boom()

    def __str__(self) -> str:
        raise Boom()


class LenRaisesStr(str):
    def __len__(self) -> int:
        raise Boom()

    def __bool__(self) -> bool:
        raise Boom()


class ClassRaises:
    @property  # type: ignore[misc]
    def __class__(self) -> type:
        raise Boom()


class ItemsRaisesMapping(Mapping):  # type: ignore[type-arg]
    def __getitem__(self, key: Any) -> Any:
        raise Boom()

    def __iter__(self) -> Any:
        raise Boom()

    def __len__(self) -> int:
        return 1


class LenRaisesMapping(ItemsRaisesMapping):
    def __len__(self) -> int:
        raise Boom()


class ItemsRaisesDict(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise Boom()

    def keys(self) -> Any:
        raise Boom()

    def __iter__(self) -> Any:
        raise Boom()


class ValuesRaisesDict(dict):  # type: ignore[type-arg]
    def values(self) -> Any:
        raise Boom()


class IntStrRaises(int):
    def __str__(self) -> str:
        raise Boom()

    def __repr__(self) -> str:
        raise Boom()


class IndexOnly:
    def __index__(self) -> int:
        return 5

    def __str__(self) -> str:
        raise Boom()


class DumpRaisesBoom:
    def model_dump(self) -> Dict[str, Any]:
        raise Boom()


class DumpMutatesItsParent:
    """Adds a key to the dict holding it each time it is converted (the C encoder then
    stops with "dictionary changed size during iteration")."""

    def __init__(self, parent: Dict[str, Any]) -> None:
        self.parent = parent

    def model_dump(self) -> Dict[str, Any]:
        self.parent[f"added-{len(self.parent)}"] = 1
        return {"ok": True}


def mutating_properties() -> Dict[str, Any]:
    inner: Dict[str, Any] = {"x": 1}
    inner["m"] = DumpMutatesItsParent(inner)
    return {"a": {"b": inner}}


@dataclasses.dataclass
class FieldRaises:
    x: int = 1

    def __getattribute__(self, name: str) -> Any:
        if name == "x":
            raise Boom()
        return object.__getattribute__(self, name)


class EnumValueRaises(enum.Enum):
    A = 1

    @property
    def value(self) -> Any:  # type: ignore[override]
        raise Boom()


class DecimalFloatRaises(decimal.Decimal):
    def __float__(self) -> float:
        raise Boom()


class IsoformatRaises(dt.datetime):
    def isoformat(self, *args: Any, **kwargs: Any) -> str:
        raise Boom()


class IsoformatRaisesDate(dt.date):
    def isoformat(self) -> str:
        raise Boom()


class IterRaisesSet(set):  # type: ignore[type-arg]
    def __iter__(self) -> Any:
        raise Boom()


class KeyReprRaises:
    def __hash__(self) -> int:
        return 7

    def __str__(self) -> str:
        raise Boom()

    def __repr__(self) -> str:
        raise Boom()


def ok(result: Any) -> None:
    """The value was usable after all (a documented conversion): encoded, no error."""
    assert isinstance(result, bytes)


# (id, value placed at properties.a.b / traits.a.b, the path fragment the error names,
#  or None when the value is accepted)
HOSTILE_VALUES: List[Tuple[str, Callable[[], Any], Optional[str]]] = [
    ("str-subclass-repr-raises", lambda: ReprRaisesStr("v"), None),
    ("object-whose-class-raises", ClassRaises, ".a.b"),
    ("mapping-whose-iter-raises", ItemsRaisesMapping, ".a.b"),
    ("mapping-whose-len-raises", LenRaisesMapping, ".a.b"),
    ("dict-whose-items-keys-iter-raise", lambda: ItemsRaisesDict(k=1), ".a.b"),
    ("int-whose-str-raises", lambda: IntStrRaises(5), None),
    ("model-dump-raises-an-unprintable-error", DumpRaisesBoom, ".a.b"),
    ("dataclass-field-raises", FieldRaises, ".a.b"),
    ("enum-value-raises", lambda: EnumValueRaises.A, ".a.b"),
    ("decimal-float-raises", lambda: DecimalFloatRaises("1.5"), ".a.b"),
    ("decimal-with-a-billion-digits", lambda: decimal.Decimal("1e999999999"), ".a.b"),
    ("decimal-signaling-nan", lambda: decimal.Decimal("sNaN"), ".a.b"),
    ("datetime-isoformat-raises", lambda: IsoformatRaises(2024, 1, 2), ".a.b"),
    ("date-isoformat-raises", lambda: IsoformatRaisesDate(2024, 1, 2), ".a.b"),
    ("set-whose-iteration-raises", lambda: IterRaisesSet({1}), ".a.b"),
    ("int-too-long-to-print", lambda: 10**5000, ".a.b"),
    ("list-holding-a-hostile-object", lambda: [1, ClassRaises()], ".a.b[1]"),
]


def hostile_calls() -> List[Any]:
    """Every hostile object in every place a user object can go."""
    cases = []
    for name, make, path in HOSTILE_VALUES:
        cases.append(
            pytest.param(
                lambda m=make: encode_track("E", {"a": {"b": m()}}, "u", None),
                None if path is None else "properties" + path,
                id=f"properties-{name}",
            )
        )
        cases.append(
            pytest.param(
                lambda m=make: encode_identify("u", {"a": {"b": m()}}),
                None if path is None else "traits" + path,
                id=f"traits-{name}",
            )
        )
    keys = [
        ("key-str-subclass-repr-raises", lambda: ReprRaisesStr("k"), None),
        ("key-whose-str-and-repr-raise", KeyReprRaises, "properties.a"),
        ("key-int-too-long-to-print", lambda: 10**5000, "properties.a"),
        ("key-int-whose-str-raises", lambda: IntStrRaises(3), None),
    ]
    for name, make, path in keys:
        cases.append(
            pytest.param(lambda m=make: encode_track("E", {"a": {m(): 1}}, "u", None), path, id=name)
        )
        # the same key beside a tuple key: the slow path, which builds the paths
        cases.append(
            pytest.param(
                lambda m=make: encode_track("E", {"a": {m(): 1, (1,): 2}}, "u", None),
                path,
                id=f"{name}-slow-path",
            )
        )
    tops: List[Tuple[str, Callable[[], Any], Optional[str]]] = [
        (
            "properties-object-whose-class-raises",
            lambda: encode_track("E", ClassRaises(), "u", None),
            "properties",
        ),
        (
            "properties-mapping-whose-len-raises",
            lambda: encode_track("E", LenRaisesMapping(), "u", None),
            "properties",
        ),
        (
            "properties-mapping-whose-iter-raises",
            lambda: encode_track("E", ItemsRaisesMapping(), "u", None),
            "properties",
        ),
        (
            "properties-dict-whose-items-raise",
            lambda: encode_track("E", ItemsRaisesDict(k=1), "u", None),
            "properties",
        ),
        (
            "properties-dict-whose-values-raise",
            lambda: encode_track("E", ValuesRaisesDict(k={"n": 1}), "u", None),
            None,
        ),
        ("properties-changed-while-read", lambda: encode_track("E", mutating_properties(), "u", None), None),
        ("traits-object-whose-class-raises", lambda: encode_identify("u", ClassRaises()), "traits"),
        (
            "event-name-str-subclass-repr-raises",
            lambda: encode_track(ReprRaisesStr("E"), None, "u", None),
            None,
        ),
        ("event-name-whose-len-raises", lambda: encode_track(LenRaisesStr("E"), None, "u", None), None),
        ("event-name-whose-class-raises", lambda: encode_track(ClassRaises(), None, "u", None), "event name"),
        ("event-name-whose-repr-raises", lambda: encode_track(StrRaises(), None, "u", None), "event name"),
        ("user-id-str-subclass-repr-raises", lambda: encode_identify(ReprRaisesStr("u"), None), None),
        ("user-id-whose-len-raises", lambda: encode_identify(LenRaisesStr("u"), None), None),
        ("user-id-whose-class-raises", lambda: encode_identify(ClassRaises(), None), "user_id"),
        ("user-id-int-whose-str-raises", lambda: encode_identify(IntStrRaises(5), None), None),
        ("user-id-index-only", lambda: encode_identify(IndexOnly(), None), "user_id"),
        ("group-id-whose-class-raises", lambda: encode_group(ClassRaises(), None, None), "group_id"),
        (
            "timestamp-whose-class-raises",
            lambda: encode_track("E", None, "u", None, timestamp=ClassRaises()),
            "timestamp",
        ),
        (
            "timestamp-isoformat-raises",
            lambda: encode_track("E", None, "u", None, timestamp=IsoformatRaises(2024, 1, 2)),
            None,
        ),
        (
            "message-id-whose-class-raises",
            lambda: encode_track("E", None, "u", None, message_id=ClassRaises()),
            "message_id",
        ),
        (
            "message-id-str-subclass-repr-raises",
            lambda: encode_track("E", None, "u", None, message_id=ReprRaisesStr("m")),
            None,
        ),
    ]
    for name, call, path in tops:
        cases.append(pytest.param(call, path, id=name))
    return cases


@pytest.mark.parametrize("call, path", hostile_calls())
def test_a_hostile_object_gives_a_validation_error_naming_its_path_or_is_used(
    call: Callable[[], Any], path: Optional[str]
) -> None:
    try:
        result = call()
    except ValidationError as exc:
        assert path is not None, f"refused, but it should have been accepted: {exc}"
        message = str(exc)  # a message that can itself be printed
        assert message.startswith(path), message
        assert type(exc) is ValidationError
        assert exc.__cause__ is None  # no user object kept alive through the chain
    else:
        assert path is None, f"accepted, but {path} should have been refused"
        ok(result)
        decode(result)


def test_hostile_objects_through_a_client_queue_nothing_and_hurt_no_neighbour(harness: Neighbours) -> None:
    for name, make, path in HOSTILE_VALUES:
        tracked = harness.client.stats()["tracked"]
        error, arrived = harness.around(
            lambda m=make: harness.client.track("E", {"a": {"b": m()}}, user_id="u")
        )
        if path is None:
            assert error is None and len(arrived) == 1, (name, error)
        else:
            assert isinstance(error, ValidationError) and str(error).startswith("properties" + path), (
                name,
                error,
            )
            assert arrived == [] and harness.client.stats()["tracked"] == tracked + 2, name


def test_depth_limit_does_not_depend_on_key_types(harness: Neighbours):
    depth = 120
    plain, _ = harness.around(lambda: harness.client.track("E", nested(depth), user_id="u"))
    int_keys, _ = harness.around(lambda: harness.client.track("E", nested(depth, key=1), user_id="u"))
    tuple_keys, _ = harness.around(lambda: harness.client.track("E", nested(depth, key=(1,)), user_id="u"))
    outcomes = [type(e).__name__ for e in (plain, int_keys, tuple_keys)]
    assert len(set(outcomes)) == 1, outcomes


# ---------------------------------------------------------------------------------------
# timeouts of the blocking calls


def test_negative_timeout_means_do_not_wait(harness: Neighbours):
    harness.client.track("E", user_id="u")
    start = time.monotonic()
    result = harness.client.flush(timeout=-1)
    assert time.monotonic() - start < SLACK and result.unsent in (0, 1)
    harness.around(lambda: None)


def test_infinite_timeout_of_track_sync_means_no_limit(harness: Neighbours):
    response = harness.client.track_sync("E", user_id="u", timeout=INF)
    assert response.accepted == 1
    harness.around(lambda: None)


def test_infinite_timeout_of_flush_means_no_limit(harness: Neighbours):
    error, _ = harness.around(lambda: harness.client.flush(timeout=INF))
    assert error is None, repr(error)


@pytest.mark.parametrize("forever", [1e10, 1e300, 10**400], ids=["1e10", "1e300", "int-10e400"])
def test_a_huge_timeout_means_no_limit_and_overflows_nothing(harness: Neighbours, forever: Any) -> None:
    response = harness.client.track_sync("E", user_id="u", timeout=forever)
    assert response.accepted == 1
    harness.client.track("E", user_id="u")
    error, _ = harness.around(lambda: harness.client.flush(timeout=forever))
    assert error is None, repr(error)
    harness.client.track("E", user_id="u")
    harness.client.shutdown(timeout=forever)
    stats = harness.client.stats()
    assert stats["queued"] == 0 and conserved(stats) and stats["sent"] == stats["tracked"], stats


EXIT_SCRIPT = """
import sys, klime
client = klime.Client("%s", endpoint=sys.argv[1], exit_timeout=1e10, flush_interval=60_000)
for i in range(6):
    client.track("at-exit-%%d" %% i, user_id="u")
"""


def test_an_exit_timeout_of_1e10_sends_everything_at_exit(
    collector: Collector, src_env: Dict[str, str]
) -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT % WRITE_KEY, collector.url],
        env=src_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "OverflowError" not in done.stderr, done.stderr
    names = sorted(e["event"] for e in collector.events())
    assert names == [f"at-exit-{i}" for i in range(6)], (names, done.stderr)


@pytest.mark.parametrize("timeout", ["soon", NAN], ids=["str", "nan"])
def test_a_bad_shutdown_timeout_loses_nothing(make_client, collector, timeout):
    errors = Recorder()
    client = make_client(flush_interval=60_000, on_error=errors)
    for _ in range(3):
        client.track("E", user_id="u")
    with pytest.raises((TypeError, ValueError, OverflowError, klime.KlimeError)):
        client.shutdown(timeout=timeout)
    client.shutdown(timeout=SETTLE)  # a second, correct call must still deliver or report
    stats = client.stats()
    assert stats["queued"] == 0 and stats["sent"] + len(errors.events) == 3, stats


@pytest.mark.parametrize("method", ["flush", "shutdown", "track_sync"])
def test_a_timeout_of_the_wrong_type_is_a_clear_error(make_client, method):
    client = make_client()
    call = {
        "flush": lambda: client.flush(timeout="soon"),
        "shutdown": lambda: client.shutdown(timeout="soon"),
        "track_sync": lambda: client.track_sync("E", user_id="u", timeout="soon"),
    }[method]
    with pytest.raises((TypeError, ValueError)):
        call()


# ---------------------------------------------------------------------------------------
# callbacks and loggers that misbehave


def fail_one(h: Neighbours, fault: Fault, name: str = "rejected") -> None:
    """Send one event alone into ``fault`` and wait until it is resolved."""
    h.collector.respond(fault)
    h.client.track(name, user_id="u")
    assert h.client.flush(timeout=SETTLE).unsent == 0


def test_on_error_that_raises(make_client, collector):
    calls = Recorder()

    def on_error(error: SendError, events: List[Dict[str, Any]]) -> None:
        calls(error, events)
        raise RuntimeError("on_error is broken")

    h = Neighbours(make_client(flush_interval=60_000, on_error=on_error), collector)
    h.around(lambda: fail_one(h, Fault.status_code(400)), separate=True)
    h.around(lambda: fail_one(h, Fault.status_code(422), "rejected-again"), separate=True)
    assert [e["event"] for e in calls.events] == ["rejected", "rejected-again"]


def test_on_success_that_raises(make_client, collector):
    def on_success(response: Any) -> None:
        raise ValueError("on_success is broken")

    h = Neighbours(make_client(flush_interval=60_000, on_success=on_success), collector)
    for _ in range(3):
        h.around(lambda: h.client.track("E", user_id="u"))
    assert h.client.stats()["sent"] == 9


@pytest.mark.parametrize("which", ["on_error", "on_success"])
def test_a_callback_that_blocks_delays_nothing_else_and_loses_nothing(make_client, collector, which):
    release = threading.Event()
    entered = threading.Event()

    def blocking(*args: Any) -> None:
        if not release.is_set():
            entered.set()
            release.wait(SETTLE)

    client = make_client(flush_interval=60_000, **{which: blocking})
    h = Neighbours(client, collector)
    if which == "on_error":
        collector.respond(Fault.status_code(400))
    client.track("first", user_id="u")
    flusher = threading.Thread(target=client.flush, kwargs={"timeout": SETTLE})
    flusher.start()
    try:
        assert entered.wait(SETTLE), "the callback was not called"
        start = time.monotonic()
        for i in range(50):
            client.track("meanwhile", {"i": i}, user_id="u")  # never waits for the callback
        assert time.monotonic() - start < SLACK
        start = time.monotonic()
        assert client.flush(timeout=0.3).unsent > 0
        assert time.monotonic() - start < 0.3 + SLACK
    finally:
        release.set()
        flusher.join(SETTLE)
    h.around(lambda: None)
    names = [e["event"] for e in collector.events()]
    assert names.count("meanwhile") == 50


def test_a_callback_raising_system_exit_does_not_kill_the_sender(make_client, collector):
    def on_success(response: Any) -> None:
        sys.exit(3)

    h = Neighbours(make_client(flush_interval=60_000, on_success=on_success), collector)
    h.around(lambda: None)
    thread = h.client.transport._thread  # type: ignore[attr-defined]
    thread.join(1.0)  # returns at once if the thread is dying; a live sender just waits 1 s
    h.assert_healthy()


def test_a_callback_raising_system_exit_loses_no_event(make_client, collector):
    """Even today (sender thread dead after the first call), nothing is lost: once the
    thread is gone the queue drains on the callers' threads."""
    calls: List[int] = []

    def on_success(response: Any) -> None:
        calls.append(1)
        if len(calls) == 1:
            sys.exit(3)

    client = make_client(flush_interval=60_000, on_success=on_success)
    client.track("E", {"i": 0}, user_id="u")
    assert client.flush(timeout=SETTLE).unsent == 0
    dying = client.transport._thread  # type: ignore[attr-defined]
    if isinstance(dying, threading.Thread):
        dying.join(SETTLE)
    for i in range(1, 5):
        client.track("E", {"i": i}, user_id="u")
        assert client.flush(timeout=SETTLE).unsent == 0
    assert len(collector.events()) == 5 and conserved(client.stats()) and len(calls) == 5


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_flush_waiting_on_a_sender_thread_that_dies_falls_back_at_once(make_client, collector):
    hold, entered = threading.Event(), threading.Event()

    class HoldingLogger:
        """Holds the dying sender thread in its last log call until the test lets go."""

        def __getattr__(self, level: str) -> Callable[..., None]:
            def emit(msg: str, *args: Any, **kwargs: Any) -> None:
                if "stopped unexpectedly" in msg:
                    entered.set()
                    hold.wait(SETTLE)

            return emit

    klime.configure(logger=HoldingLogger())
    client = make_client(flush_interval=60_000, max_batch_size=1)
    transport = client.transport
    real_fly = transport._fly  # type: ignore[attr-defined]

    def fly_then_die(*args: Any, **kwargs: Any) -> None:
        # a bug in klime itself is the only way left to kill the thread (callbacks cannot)
        real_fly(*args, **kwargs)
        if threading.current_thread().name == "klime-sender":
            raise RuntimeError("simulated bug in the sender thread")

    transport._fly = fly_then_die  # type: ignore[attr-defined]
    client.track("A", user_id="u")  # a full batch: the worker sends it, then dies
    assert entered.wait(SETTLE)
    client.track("B", user_id="u")  # queued behind a worker that is going away
    outcome: Dict[str, Any] = {}

    def flusher() -> None:
        start = time.monotonic()
        outcome["result"] = client.flush(timeout=4)
        outcome["elapsed"] = time.monotonic() - start

    waiter = threading.Thread(target=flusher)
    waiter.start()
    cond = client.transport.settled  # type: ignore[attr-defined]
    wait_until(lambda: len(cond._waiters) == 1 or not waiter.is_alive(), timeout=SETTLE)
    hold.set()  # now the thread dies
    waiter.join(SETTLE)
    assert outcome["result"].unsent == 0 and outcome["elapsed"] < 3, outcome
    assert [e["event"] for e in collector.events()] == ["A", "B"]


def test_a_callback_that_calls_flush_does_not_wait_for_itself(make_client, collector):
    box: Dict[str, Any] = {}
    inner: List[float] = []

    def on_error(error: SendError, events: List[Dict[str, Any]]) -> None:
        start = time.monotonic()
        box["client"].flush(timeout=3)
        inner.append(time.monotonic() - start)

    client = make_client(flush_interval=60_000, on_error=on_error)
    box["client"] = client
    h = Neighbours(client, collector)
    h.around(lambda: fail_one(h, Fault.status_code(400)), separate=True)
    assert inner and inner[0] < 1.0, inner


def test_a_logger_that_raises(make_client, collector):
    class Broken:
        def __getattr__(self, name: str) -> Any:
            def fail(*args: Any, **kwargs: Any) -> None:
                raise RuntimeError("logger is broken")

            return fail

    klime.configure(logger=Broken())
    h = Neighbours(make_client(flush_interval=60_000, max_queue_size=3), collector)
    for fault in (Fault.status_code(400), Fault.status_code(500), Fault.partial(0)):
        h.around(lambda fault=fault: fail_one(h, fault), separate=True)  # every failure path logs
    for i in range(10):  # overflow logs a warning
        h.client.track("overflow", {"i": i}, user_id="u")
    h.around(lambda: None)


def test_a_logging_handler_that_raises(make_client, collector, capsys):
    class BrokenHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise RuntimeError("handler is broken")

    logger = logging.getLogger("klime")
    handler = BrokenHandler(logging.DEBUG)
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        h = Neighbours(make_client(flush_interval=60_000), collector)
        h.around(lambda: fail_one(h, Fault.status_code(400)), separate=True)
        h.around(lambda: fail_one(h, Fault.status_code(503)), separate=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)


def test_an_on_error_that_is_not_callable_is_refused():
    with pytest.raises(klime.ConfigurationError, match="on_error"):
        klime.Client(WRITE_KEY, endpoint="http://127.0.0.1:9", on_error="print")
    with pytest.raises(klime.ConfigurationError, match="on_success"):
        klime.configure(on_success=42)
