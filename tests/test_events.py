"""klime._events: the wire encoding, the input rules and the conversions."""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import re
import uuid

import pytest

from klime import ValidationError
from klime._config import MAX_EVENT_BYTES
from klime._events import (
    decode,
    encode_group,
    encode_identify,
    encode_track,
    message_id,
    new_message_id,
    now_timestamp,
)
from klime._version import __version__

UUID4 = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
CTX = '"context":{"library":{"name":"python-sdk","version":"%s"}}' % re.escape(__version__)


def test_track_bytes_exactly():
    raw = encode_track("Button Clicked", {"plan": "pro"}, "user_123", None)
    assert re.fullmatch(
        rb'\{"type":"track","messageId":"'
        + UUID4.encode()
        + rb'","timestamp":"'
        + TS.encode()
        + rb'","event":"Button Clicked","userId":"user_123","properties":\{"plan":"pro"\},'
        + CTX.encode()
        + rb"\}",
        raw,
    ), raw


def test_track_group_level_and_both_ids():
    raw = encode_track("Events Received", {"count": 100}, None, "org_456")
    assert b'"groupId":"org_456","properties":{"count":100}' in raw and b"userId" not in raw
    both = decode(encode_track("x", None, "u", "g"))
    assert both["userId"] == "u" and both["groupId"] == "g" and "properties" not in both


def test_identify_bytes_exactly():
    raw = encode_identify("user_123", {"email": "user@example.com"})
    assert re.fullmatch(
        rb'\{"type":"identify","messageId":"'
        + UUID4.encode()
        + rb'","timestamp":"'
        + TS.encode()
        + rb'","userId":"user_123","traits":\{"email":"user@example.com"\},'
        + CTX.encode()
        + rb"\}",
        raw,
    ), raw


def test_group_bytes_exactly_and_link_only():
    raw = encode_group("org_456", {"name": "Acme Inc"}, "user_123")
    assert re.fullmatch(
        rb'\{"type":"group","messageId":"'
        + UUID4.encode()
        + rb'","timestamp":"'
        + TS.encode()
        + rb'","groupId":"org_456","userId":"user_123","traits":\{"name":"Acme Inc"\},'
        + CTX.encode()
        + rb"\}",
        raw,
    ), raw
    link = decode(encode_group("org_456", None, "user_123"))
    assert "traits" not in link and link["userId"] == "user_123"


def test_empty_properties_and_traits_are_omitted():
    assert "properties" not in decode(encode_track("x", {}, "u", None))
    assert "traits" not in decode(encode_identify("u", {}))


def test_int_ids_become_strings():
    ev = decode(encode_track("x", None, 42, 7))
    assert ev["userId"] == "42" and ev["groupId"] == "7"


def test_message_ids_are_uuid4_and_unique():
    ids = {new_message_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    for mid in list(ids)[:100]:
        assert re.fullmatch(UUID4, mid)
        assert uuid.UUID(mid).version == 4
    raw = encode_track("x", None, "u", None)
    assert message_id(raw) == decode(raw)["messageId"]


def test_timestamp_is_utc_now_with_ms():
    ts = now_timestamp()
    parsed = dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    assert abs((parsed - dt.datetime.now(dt.UTC)).total_seconds()) < 2


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    when: dt.date


class Model:
    def model_dump(self):
        return {"a": 1, "at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)}


def test_conversions():
    props = {
        "naive": dt.datetime(2024, 5, 6, 7, 8, 9, 123000),
        "aware": dt.datetime(2024, 5, 6, 9, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=2))),
        "day": dt.date(2024, 5, 6),
        "dec": decimal.Decimal("12.50"),
        "decint": decimal.Decimal("3"),
        "id": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "color": Color.RED,
        "set": {1},
        "tuple": (1, 2),
        "point": Point(1, dt.date(2024, 1, 1)),
        "model": Model(),
        1: "int key",
        None: "none key",
    }
    ev = decode(encode_track("x", props, "u", None))["properties"]
    assert ev["naive"] == "2024-05-06T07:08:09.123000Z"
    assert ev["aware"] == "2024-05-06T07:08:09Z"
    assert ev["day"] == "2024-05-06"
    assert ev["dec"] == 12.5 and ev["decint"] == 3
    assert ev["id"] == "12345678-1234-5678-1234-567812345678"
    assert ev["color"] == "red"
    assert ev["set"] == [1] and ev["tuple"] == [1, 2]
    assert ev["point"] == {"x": 1, "when": "2024-01-01"}
    assert ev["model"] == {"a": 1, "at": "2024-01-02T03:04:05Z"}
    assert ev["1"] == "int key" and ev["null"] == "none key"


def test_non_string_keys_are_stringified():
    ev = decode(encode_track("x", {(1, 2): "tuple key", Color.RED: "enum key"}, "u", None))
    assert ev["properties"] == {"(1, 2)": "tuple key", "Color.RED": "enum key"}


def test_unicode_is_utf8_not_escaped():
    raw = encode_track("Café ☕", {"名前": "値"}, "u", None)
    assert "Café ☕".encode() in raw and "名前".encode() in raw


class BadStr:
    def __str__(self):
        raise RuntimeError("no")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: encode_track("", None, "u", None), "event name"),
        (lambda: encode_track(None, None, "u", None), "event name"),
        (lambda: encode_track(5, None, "u", None), "event name"),
        (lambda: encode_track("x", None, None, None), "user_id or a group_id"),
        (lambda: encode_track("x", None, "", None), "user_id"),
        (lambda: encode_track("x", None, None, ""), "group_id"),
        (lambda: encode_track("x", None, 1.5, None), "user_id"),
        (lambda: encode_track("x", None, True, None), "user_id"),
        (lambda: encode_track("x", ["a"], "u", None), "properties must be a dict"),
        (lambda: encode_track("x", "a=b", "u", None), "properties must be a dict"),
        (lambda: encode_track("x", {"n": float("nan")}, "u", None), "NaN"),
        (lambda: encode_track("x", {"n": [float("inf")]}, "u", None), "NaN"),
        (lambda: encode_track("x", {"d": decimal.Decimal("NaN")}, "u", None), "Decimal"),
        (lambda: encode_track("x", {"o": object()}, "u", None), "object"),
        (lambda: encode_track("x", {"b": b"bytes"}, "u", None), "bytes"),
        (lambda: encode_track("x", {BadStr(): 1}, "u", None), "key"),
        (lambda: encode_track("x", {"s": "\ud800"}, "u", None), "surrogate"),
        (lambda: encode_track("x\udfff", None, "u", None), "surrogate"),
        (lambda: encode_identify(None, None), "user_id is required"),
        (lambda: encode_identify("", None), "user_id"),
        (lambda: encode_identify("u", 5), "traits must be a dict"),
        (lambda: encode_group(None, None, None), "group_id is required"),
        (lambda: encode_group("g", None, []), "user_id"),
        (lambda: encode_track("x", {"big": "x" * MAX_EVENT_BYTES}, "u", None), "limit"),
    ],
)
def test_bad_input_is_a_validation_error(call, message):
    with pytest.raises(ValidationError, match=re.escape(message) if message.isascii() else None):
        call()


def test_cycles_and_depth():
    cyc: dict = {}
    cyc["self"] = cyc
    with pytest.raises(ValidationError, match="cycle"):
        encode_track("x", {"a": cyc}, "u", None)
    lst: list = []
    lst.append(lst)
    with pytest.raises(ValidationError, match="cycle"):
        encode_track("x", {"a": lst}, "u", None)
    deep: dict = {}
    cur = deep
    for _ in range(5000):
        cur["a"] = {}
        cur = cur["a"]
    with pytest.raises(ValidationError, match="nested"):
        encode_track("x", deep, "u", None)


def test_the_same_dict_in_two_places_is_not_a_cycle():
    shared = {"k": 1}
    ev = decode(encode_track("x", {"a": shared, "b": [shared, shared]}, "u", None))
    assert ev["properties"] == {"a": {"k": 1}, "b": [{"k": 1}, {"k": 1}]}


def test_size_limit_is_exact():
    base = len(encode_track("x", {"p": ""}, "u", None))
    fits = encode_track("x", {"p": "a" * (MAX_EVENT_BYTES - base)}, "u", None)
    assert len(fits) == MAX_EVENT_BYTES
    with pytest.raises(ValidationError, match="204,801 bytes"):
        encode_track("x", {"p": "a" * (MAX_EVENT_BYTES - base + 1)}, "u", None)


def test_callers_dicts_are_not_mutated_and_later_changes_do_not_leak():
    props = {"when": dt.date(2024, 1, 1), "nested": {"n": 1}, 3: "x"}
    snapshot = repr(props)
    raw = encode_track("x", props, "u", None)
    assert repr(props) == snapshot
    props["nested"]["n"] = 2
    props["new"] = True
    assert decode(raw)["properties"] == {"when": "2024-01-01", "nested": {"n": 1}, "3": "x"}


def test_mapping_that_is_not_a_dict():
    from types import MappingProxyType

    ev = decode(encode_track("x", MappingProxyType({"a": 1}), "u", None))
    assert ev["properties"] == {"a": 1}


def test_str_subclass_event_name():
    class Name(str):
        pass

    assert decode(encode_track(Name("Signup"), None, "u", None))["event"] == "Signup"


def test_json_roundtrip_is_valid():
    raw = encode_track('q"uote\\', {"x": "line\nbreak", "e": "\u2028"}, 'u"', None)
    ev = json.loads(raw)
    assert ev["event"] == 'q"uote\\' and ev["userId"] == 'u"'


@pytest.mark.parametrize("key", ["a", 1, (1,)])  # the C encoder's path, and the slow path
def test_the_depth_limit_is_the_same_on_every_path_and_every_python(key):
    from klime._config import MAX_DEPTH

    def nested(depth):
        root: dict = {}
        cur = root
        for _ in range(depth - 1):
            cur[key] = {}
            cur = cur[key]
        cur[key] = [1]  # a list is a level too
        return root

    encode_track("x", nested(MAX_DEPTH - 1), "u", None)  # MAX_DEPTH levels: fine
    with pytest.raises(ValidationError, match=f"nested more than {MAX_DEPTH} levels deep"):
        encode_track("x", nested(MAX_DEPTH), "u", None)
    with pytest.raises(ValidationError, match="nested more than"):
        encode_track("x", nested(100_000), "u", None)  # never the encoder's own limit


# ---------------------------------------------------------------------------------------
# caller-chosen timestamps and message ids (issue 22)

UTC = dt.UTC


def test_a_naive_timestamp_is_taken_as_utc_with_milliseconds_truncated():
    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678999)
    raw = encode_track("x", None, "u", None, timestamp=when)
    assert decode(raw)["timestamp"] == "2026-01-02T03:04:05.678Z"
    assert (
        raw.startswith(b'{"type":"track","messageId":"') and b'"timestamp":"2026-01-02T03:04:05.678Z",' in raw
    )


@pytest.mark.parametrize(
    "when, wire",
    [
        (dt.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC), "2026-01-02T03:04:05.678Z"),
        (
            dt.datetime(2026, 1, 2, 5, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=2))),
            "2026-01-02T03:04:05.000Z",
        ),
        (
            dt.datetime(2026, 1, 1, 22, 4, 5, 1000, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            "2026-01-02T03:04:05.001Z",
        ),
        (
            dt.datetime(2026, 1, 2, 8, 49, 5, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
            "2026-01-02T03:04:05.000Z",
        ),
        (dt.datetime(1970, 1, 1), "1970-01-01T00:00:00.000Z"),
    ],
    ids=["utc", "plus-2h", "minus-5h-across-midnight", "nepal", "epoch"],
)
def test_an_aware_timestamp_is_converted_to_utc(when, wire):
    for raw in (
        encode_track("x", None, "u", None, timestamp=when),
        encode_identify("u", None, timestamp=when),
        encode_group("g", None, None, timestamp=when),
    ):
        assert decode(raw)["timestamp"] == wire


def test_a_tzinfo_without_an_offset_counts_as_naive():
    class NoOffset(dt.tzinfo):
        def utcoffset(self, d):
            return None

    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=NoOffset())
    assert (
        decode(encode_track("x", None, "u", None, timestamp=when))["timestamp"] == "2026-01-02T03:04:05.000Z"
    )


def test_a_timestamp_has_the_same_wire_form_as_now():
    now = dt.datetime.now(UTC)
    ours = decode(encode_track("x", None, "u", None, timestamp=now))["timestamp"]
    assert re.fullmatch(TS, ours) and len(ours) == len(now_timestamp())


def test_a_timestamp_up_to_24_hours_ahead_is_accepted():
    soon = dt.datetime.now(UTC) + dt.timedelta(hours=23, minutes=59)
    encode_track("x", None, "u", None, timestamp=soon)


def test_the_message_id_alone_keeps_a_fresh_timestamp_and_vice_versa():
    ev = decode(encode_track("x", None, "u", None, message_id="m-1"))
    assert ev["messageId"] == "m-1" and re.fullmatch(TS, ev["timestamp"])
    ev = decode(encode_identify("u", None, timestamp=dt.datetime(2020, 1, 1)))
    assert re.fullmatch(UUID4, ev["messageId"]) and ev["timestamp"] == "2020-01-01T00:00:00.000Z"


@pytest.mark.parametrize(
    "timestamp, message",
    [
        ("2026-01-02T03:04:05Z", "timestamp must be a datetime.datetime"),
        (1767323045, "timestamp must be a datetime.datetime"),
        (1767323045.5, "timestamp must be a datetime.datetime"),
        (dt.date(2026, 1, 2), "timestamp must be a datetime.datetime"),
        (True, "timestamp must be a datetime.datetime"),
        (dt.datetime(1969, 12, 31, 23, 59, 59, 999999), "before 1970"),
        (dt.datetime(1, 1, 1), "before 1970"),
        (dt.datetime(1, 1, 1, tzinfo=dt.timezone(dt.timedelta(hours=23, minutes=59))), "before 1970"),
        (dt.datetime(9999, 12, 31, 23, 59, 59, 999999), "more than 24 hours in the future"),
        (
            dt.datetime(9999, 12, 31, 23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-23, minutes=-59))),
            "in the future",
        ),
        (dt.datetime(2200, 1, 1), "more than 24 hours in the future"),
    ],
    ids=[
        "str",
        "int",
        "float",
        "date",
        "bool",
        "just-before-1970",
        "year-1",
        "year-1-east",
        "year-9999",
        "year-9999-west",
        "year-2200",
    ],
)
def test_a_bad_timestamp_is_a_validation_error(timestamp, message):
    for call in (
        lambda: encode_track("x", None, "u", None, timestamp=timestamp),
        lambda: encode_identify("u", None, timestamp=timestamp),
        lambda: encode_group("g", None, "u", timestamp=timestamp),
    ):
        with pytest.raises(ValidationError, match=re.escape(message)):
            call()


def test_a_timestamp_25_hours_ahead_is_refused():
    later = dt.datetime.now(UTC) + dt.timedelta(hours=25)
    with pytest.raises(ValidationError, match="more than 24 hours in the future"):
        encode_track("x", None, "u", None, timestamp=later)


def test_a_datetime_whose_offset_raises_is_a_validation_error():
    class Broken(dt.tzinfo):
        def utcoffset(self, d):
            raise RuntimeError("no offset")

    with pytest.raises(ValidationError, match="timestamp"):
        encode_track("x", None, "u", None, timestamp=dt.datetime(2026, 1, 1, tzinfo=Broken()))


@pytest.mark.parametrize(
    "mid",
    ['order-42/"quoted"\\back', "名前-☕-🎉", "x", "a" * 200, "  spaced  ", "\u2028line-sep", "ünïcödé"],
    ids=["quotes-backslash", "cjk-emoji", "one-char", "200-chars", "spaces", "u2028", "accents"],
)
def test_a_message_id_is_sent_exactly_as_given(mid):
    for raw in (
        encode_track("x", {"p": 1}, "u", None, message_id=mid),
        encode_identify("u", None, message_id=mid),
        encode_group("g", {"t": 1}, "u", message_id=mid),
    ):
        assert decode(raw)["messageId"] == mid
        assert message_id(raw) == mid  # what the SQS sender's de-duplication reads


def test_a_str_subclass_message_id_is_sent_by_value():
    class Id(str):
        def __str__(self):
            raise RuntimeError("not used")

    assert decode(encode_track("x", None, "u", None, message_id=Id("m-1")))["messageId"] == "m-1"


@pytest.mark.parametrize(
    "mid, message",
    [
        (b"m-1", "message_id must be a non-empty str, not bytes"),
        (42, "message_id must be a non-empty str, not int"),
        (uuid.UUID(int=1), "not UUID"),
        ("", "message_id must be a non-empty str"),
        ("a" * 201, "201 characters long; the limit is 200"),
        ("a\nb", "control character"),
        ("a\x00b", "control character"),
        ("a\x85b", "control character"),
        ("a\ud800b", "lone surrogate"),
    ],
    ids=["bytes", "int", "uuid", "empty", "201-chars", "newline", "nul", "c1", "surrogate"],
)
def test_a_bad_message_id_is_a_validation_error(mid, message):
    for call in (
        lambda: encode_track("x", None, "u", None, message_id=mid),
        lambda: encode_identify("u", None, message_id=mid),
        lambda: encode_group("g", None, "u", message_id=mid),
    ):
        with pytest.raises(ValidationError, match=re.escape(message)):
            call()


def test_message_id_reads_klimes_own_ids_too():
    raw = encode_track("x", {"messageId": "decoy"}, "u", None)
    assert message_id(raw) == decode(raw)["messageId"] and re.fullmatch(UUID4, message_id(raw))


# ---------------------------------------------------------------------------------------
# keys that collide once stringified (issue 20)


@pytest.mark.parametrize(
    "properties, where, key",
    [
        ({1: "a", "1": "b"}, "properties", "1"),
        ({"1": "b", 1: "a"}, "properties", "1"),
        ({True: 1, "true": 2}, "properties", "true"),
        ({None: 1, "null": 2}, "properties", "null"),
        ({1.5: 1, "1.5": 2}, "properties", "1.5"),
        ({"a": {"b": {2: "x", "2": "y"}}}, "properties.a.b", "2"),
        ({"list": [{"k": 1}, {3: "x", "3": "y"}]}, "properties.list[1]", "3"),
        ({"a": {(1, 2): "x", "(1, 2)": "y"}}, "properties.a", "(1, 2)"),
        ({"pad": "{" * 10, 1: "a", "1": "b"}, "properties", "1"),
    ],
    ids=[
        "int-then-str",
        "str-then-int",
        "bool",
        "none",
        "float",
        "nested",
        "in-a-list",
        "tuple",
        "brace-in-a-string",
    ],
)
def test_keys_that_become_the_same_string_are_refused(properties, where, key):
    with pytest.raises(ValidationError) as info:
        encode_track("x", properties, "u", None)
    assert str(info.value) == f'{where} has two keys that both become "{key}"'


def test_a_long_event_with_colliding_keys_is_refused_too():
    props = {"pad": "x" * 2000, "deep": {"deeper": {7: "a", "7": "b"}}}
    with pytest.raises(
        ValidationError, match=re.escape('properties.deep.deeper has two keys that both become "7"')
    ):
        encode_track("x", props, "u", None)


def test_non_string_keys_that_do_not_collide_still_work_on_every_path():
    props = {1: "a", 2: "b", "nested": {3: [{4: "c"}]}, "pad": "{"}
    assert decode(encode_track("x", props, "u", None))["properties"] == {
        "1": "a",
        "2": "b",
        "nested": {"3": [{"4": "c"}]},
        "pad": "{",
    }
    long_props = dict(props, big="x" * 2000)
    assert decode(encode_track("x", long_props, "u", None))["properties"]["nested"] == {"3": [{"4": "c"}]}


def test_paths_in_messages_name_keys_with_dots():
    with pytest.raises(ValidationError, match=r"^properties\.a\.b is NaN"):
        encode_track("x", {"a": {"b": float("nan")}}, "u", None)
    with pytest.raises(ValidationError, match=r'^traits\["odd key"\]\[2\] is Infinity'):
        encode_identify("u", {"odd key": [1, 2, float("inf")]})


def test_keys_that_collide_inside_a_model_dump_are_refused_too() -> None:
    """What a ``model_dump()`` or a dataclass returns is checked like the caller's own dicts."""

    class Model:
        def model_dump(self) -> dict:
            return {1: "a", "1": "b"}

    with pytest.raises(ValidationError, match=r'properties\.m has two keys that both become "1"'):
        encode_track("E", {"m": Model()}, "u", None)


def test_the_keys_of_properties_and_traits_go_out_sorted() -> None:
    """Sorting lets the C encoder itself refuse a dict whose keys could collide; the order of
    keys means nothing in JSON, and the server does not keep it."""
    body = json.loads(encode_track("E", {"b": 1, "a": {"z": 1, "y": [{"d": 0, "c": 1}]}}, "u", None))
    assert json.dumps(body["properties"]) == '{"a": {"y": [{"c": 1, "d": 0}], "z": 1}, "b": 1}'
