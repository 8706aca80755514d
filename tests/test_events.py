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
