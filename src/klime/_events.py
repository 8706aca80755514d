"""Building events: input rules, JSON coercion, the wire encoding, message ids.

An event is encoded ONCE, on the caller's thread, to the exact UTF-8 JSON bytes that go on
the wire. Encoding is also validation: a value that cannot become JSON raises
:class:`~klime.ValidationError` here, so nothing bad is ever queued and a later mutation of
the caller's dicts cannot change a queued event. Everything downstream (batching, senders,
callbacks) works on these bytes; :func:`decode` turns them back into a wire dict when a
callback or a test needs one.

Thread-safe: the functions here keep no state but a random generator (re-seeded in a forked
child) and a one-entry timestamp cache.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import decimal
import enum
import json
import math
import os
import random
import time
import uuid
from collections.abc import Mapping
from json.encoder import encode_basestring as _c_quote
from typing import Any, Callable, Dict, Optional, Sequence

from ._config import MAX_DEPTH, MAX_EVENT_BYTES
from ._version import __version__
from .errors import ValidationError

__all__ = [
    "Properties",
    "encode_track",
    "encode_identify",
    "encode_group",
    "decode",
    "decode_all",
    "message_id",
    "reseed",
    "to_json_value",
]

Properties = Optional[Mapping[str, Any]]


LIBRARY_NAME = "python-sdk"
_CONTEXT = json.dumps({"library": {"name": LIBRARY_NAME, "version": __version__}}, separators=(",", ":"))
_TAIL = f',"context":{_CONTEXT}}}'

# ---------------------------------------------------------------------------------------
# message ids: uuid4 text from a private generator, seeded from os.urandom and re-seeded
# in every forked child (fork hooks, and the Client's pid check for forks without hooks).

_rng = random.Random(os.urandom(32))
_getrandbits = _rng.getrandbits
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def reseed() -> None:
    """Give this process its own message-id sequence (called after a fork)."""
    _rng.seed(os.urandom(32))


os.register_at_fork(after_in_child=reseed)


def new_message_id() -> str:
    """A random (version 4) UUID as text."""
    h = "%032x" % _getrandbits(128)
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# ---------------------------------------------------------------------------------------
# timestamps: ISO 8601 UTC with milliseconds and "Z"; the second's prefix is cached.

_ts_cache: tuple[int, str] = (-1, "")  # (millisecond, its text): events come in bursts
_sec_cache: tuple[int, str] = (-1, "")  # (second, "YYYY-MM-DDTHH:MM:SS")


def now_timestamp() -> str:
    global _ts_cache, _sec_cache
    ms = int(time.time() * 1000)
    cached_ms, text = _ts_cache
    if ms == cached_ms:
        return text
    sec = ms // 1000
    cached_sec, prefix = _sec_cache
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        _sec_cache = (sec, prefix)
    text = "%s.%03dZ" % (prefix, ms - sec * 1000)
    _ts_cache = (ms, text)
    return text


# ---------------------------------------------------------------------------------------
# JSON coercion


def _iso_datetime(value: _dt.datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.UTC)
    else:
        value = value.astimezone(_dt.UTC)
    text = value.isoformat()
    return text[:-6] + "Z" if text.endswith("+00:00") else text


class _Unsupported(TypeError):
    pass


def _default(value: Any) -> Any:
    """json's ``default`` hook: the documented conversions, or TypeError."""
    if isinstance(value, _dt.datetime):
        return _iso_datetime(value)
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump()
    raise _Unsupported(type(value).__name__)


def _make_encoder() -> Callable[[Any], str]:
    """The fastest compact, strict JSON encoder this Python offers.

    Prefer the C encoder built once, without a shared ``markers`` dict: it keeps no state
    between calls (so threads cannot disturb each other) and a cycle ends in RecursionError,
    which sends the value to the slow path that names the cycle.
    """
    fallback = json.JSONEncoder(
        ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_default
    ).encode
    maker = getattr(json.encoder, "c_make_encoder", None)
    quote = getattr(json.encoder, "c_encode_basestring", None)
    if maker is None or quote is None:
        return fallback
    try:
        c_encode = maker(None, _default, quote, None, ":", ",", False, False, False)
        c_encode({"probe": [1.5, None, True]}, 0)
    except Exception:
        return fallback
    join = "".join

    def encode(value: Any) -> str:
        return join(c_encode(value, 0))

    return encode


_encode = _make_encoder()


def _describe(value: Any) -> str:
    return type(value).__qualname__


def _clip(path: str) -> str:
    return path if len(path) <= 120 else path[:60] + "..." + path[-50:]


def _plain_key(key: Any, path: str) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, (bool, int, float)):
        return json.dumps(key) if not isinstance(key, str) else key
    try:
        return str(key)
    except Exception as exc:
        raise ValidationError(
            f"{_clip(path)} has a key of type {_describe(key)} that cannot be turned into a string: {exc!r}"
        ) from None


def to_json_value(
    value: Any, path: str = "value", _depth: int = 0, _seen: frozenset[int] = frozenset()
) -> Any:
    """Return ``value`` as plain JSON data, or raise ValidationError naming where it is bad.

    This is the slow path, used only when the fast C encoder refused a value, to explain why
    (or to stringify keys it does not accept).
    """
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{_clip(path)} is {value!r}; NaN and Infinity are not valid JSON")
        return value
    if isinstance(value, bytes):
        raise ValidationError(f"{_clip(path)} is bytes; decode it to a string first")
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        if id(value) in _seen:
            raise ValidationError(f"{_clip(path)} contains itself (a reference cycle)")
        if _depth >= MAX_DEPTH:
            raise ValidationError(f"{_clip(path)} is nested more than {MAX_DEPTH} levels deep")
        seen = _seen | {id(value)}
        if isinstance(value, Mapping):
            out: Dict[str, Any] = {}
            for key, item in value.items():
                skey = _plain_key(key, path)
                out[skey] = to_json_value(item, f"{path}[{skey!r}]", _depth + 1, seen)
            return out
        return [to_json_value(item, f"{path}[{i}]", _depth + 1, seen) for i, item in enumerate(value)]
    try:
        converted = _default(value)
    except _Unsupported:
        raise ValidationError(
            f"{_clip(path)} is of type {_describe(value)}, which klime cannot turn into JSON "
            "(convert it to a str, number, bool, None, list or dict)"
        ) from None
    except Exception as exc:
        raise ValidationError(
            f"{_clip(path)} ({_describe(value)}) cannot be turned into JSON: {exc}"
        ) from None
    return to_json_value(converted, path, _depth + 1, _seen | {id(value)})


def _deeper_than(value: Any, limit: int) -> bool:
    """Does ``value`` nest dicts/lists more than ``limit`` levels deep? Iterative (no
    recursion limit), stops at the first path that is too deep."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _too_deep(what: str) -> ValidationError:
    return ValidationError(f"{what} is nested more than {MAX_DEPTH} levels deep")


def _json_object(value: Any, what: str) -> str | None:
    """Encode properties/traits; None when absent or empty."""
    if type(value) is dict:
        if not value:
            return None
        try:
            text = _encode(value)  # the fast path: one C-level pass that also validates
        except Exception:
            pass  # the slow path below explains the problem precisely (or fixes keys)
        else:
            # Each level of nesting takes at least two characters, so a short text is never
            # too deep: the depth is looked at only for large values (the C encoder's own
            # limit differs from one Python to the next; this one does not).
            if len(text) < 2 * MAX_DEPTH or not _deeper_than(value, MAX_DEPTH):
                return text
            raise _too_deep(what)
    elif value is None:
        return None
    elif not isinstance(value, Mapping):
        raise ValidationError(f"{what} must be a dict, not {_describe(value)}")
    elif not value:
        return None
    try:
        plain = to_json_value(value, what)
    except RecursionError:
        raise _too_deep(what) from None
    try:
        return _encode(plain)
    except RecursionError:
        raise _too_deep(what) from None
    except Exception as exc:  # e.g. an int too long to print (sys.set_int_max_str_digits)
        raise ValidationError(f"{what} cannot be turned into JSON: {exc}") from None


# ---------------------------------------------------------------------------------------
# ids and names


def _id(value: Any, name: str) -> str | None:
    if type(value) is str:
        if value:
            return value
        raise ValidationError(f"{name} must be a non-empty string")
    if value is None:
        return None
    if isinstance(value, str):  # a str subclass: its own __str__ is not trusted
        if value:
            return str.__str__(value)
        raise ValidationError(f"{name} must be a non-empty string")
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return int.__repr__(value)
        except ValueError:  # too many digits to print
            raise ValidationError(f"{name} is an int too large to use as an id") from None
    raise ValidationError(f"{name} must be a non-empty string (or an int), not {_describe(value)}")


def _required_id(value: Any, name: str) -> str:
    result = _id(value, name)
    if result is None:
        raise ValidationError(f"{name} is required")
    return result


def _finish(text: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            "the event contains a lone surrogate or other text that is not valid Unicode"
        ) from None
    if len(raw) > MAX_EVENT_BYTES:
        raise ValidationError(
            f"the event is {len(raw):,} bytes of JSON; the limit is {MAX_EVENT_BYTES:,} bytes"
        )
    return raw


def encode_track(event: Any, properties: Properties, user_id: Any, group_id: Any) -> bytes:
    """Validate and encode a ``track`` event. Raises ValidationError."""
    if type(event) is not str or not event:
        if not isinstance(event, str) or not event:
            raise ValidationError(f"event name must be a non-empty string, not {_short(event)}")
        event = str.__str__(event)
    uid = _id(user_id, "user_id")
    gid = _id(group_id, "group_id")
    props = _json_object(properties, "properties")
    if uid is None:
        if gid is None:
            raise ValidationError("track needs a user_id or a group_id (anonymous events are not accepted)")
        ids = f',"groupId":{_c_quote(gid)}'
    elif gid is None:
        ids = f',"userId":{_c_quote(uid)}'
    else:
        ids = f',"userId":{_c_quote(uid)},"groupId":{_c_quote(gid)}'
    tail = _TAIL if props is None else f',"properties":{props}{_TAIL}'
    return _finish(
        f'{{"type":"track","messageId":"{new_message_id()}","timestamp":"{now_timestamp()}",'
        f'"event":{_c_quote(event)}{ids}{tail}'
    )


def encode_identify(user_id: Any, traits: Properties) -> bytes:
    """Validate and encode an ``identify`` event. Raises ValidationError."""
    uid = _required_id(user_id, "user_id")
    body = _json_object(traits, "traits")
    tail = _TAIL if body is None else f',"traits":{body}{_TAIL}'
    return _finish(
        f'{{"type":"identify","messageId":"{new_message_id()}","timestamp":"{now_timestamp()}",'
        f'"userId":{_c_quote(uid)}{tail}'
    )


def encode_group(group_id: Any, traits: Properties, user_id: Any) -> bytes:
    """Validate and encode a ``group`` event. Raises ValidationError."""
    gid = _required_id(group_id, "group_id")
    uid = _id(user_id, "user_id")
    body = _json_object(traits, "traits")
    user = "" if uid is None else f',"userId":{_c_quote(uid)}'
    tail = _TAIL if body is None else f',"traits":{body}{_TAIL}'
    return _finish(
        f'{{"type":"group","messageId":"{new_message_id()}","timestamp":"{now_timestamp()}",'
        f'"groupId":{_c_quote(gid)}{user}{tail}'
    )


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{_describe(value)}>"
    return text if len(text) <= 60 else text[:57] + "..."


def decode(raw: bytes) -> dict[str, Any]:
    """The wire dict of one encoded event."""
    result: dict[str, Any] = json.loads(raw)
    return result


def decode_all(events: Sequence[bytes]) -> list[dict[str, Any]]:
    """The wire dicts of encoded events, in order."""
    return [json.loads(raw) for raw in events]


def message_id(raw: bytes) -> str:
    """The messageId of an encoded event (they all start with type then messageId)."""
    start = raw.index(b'"messageId":"') + 13
    return raw[start : start + 36].decode("ascii")


Encoder = Callable[..., bytes]
