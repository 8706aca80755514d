"""Building events: input rules, JSON coercion, the wire encoding, message ids.

An event is encoded ONCE, on the caller's thread, to the exact UTF-8 JSON bytes that go on
the wire. Encoding is also validation: a value that cannot become JSON raises
:class:`~klime.ValidationError` here, so nothing bad is ever queued and a later mutation of
the caller's dicts cannot change a queued event. Everything downstream (batching, senders,
callbacks) works on these bytes; :func:`decode` turns them back into a wire dict when a
callback or a test needs one.

A caller may choose an event's ``timestamp`` and ``message_id`` (to import history or to
re-send an event under the id it already had); both are checked here like everything else.

Hostile input: whatever a user object does while it is read (a ``__str__``, ``__repr__``,
``items()``, ``model_dump()``, ``isoformat()``... that raises, a dict changed while it is
read), the only exception that leaves these functions is :class:`~klime.ValidationError`,
naming where the value is (``properties.a.b``); exceptions that are not an ``Exception``
(KeyboardInterrupt, SystemExit) pass through. Messages never call a user
object's ``repr``/``str``: they name its type.

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
import re
import time
import uuid
from collections.abc import Mapping
from json.encoder import encode_basestring as _c_quote
from json.encoder import encode_basestring_ascii as _ascii_quote
from typing import Any, Callable, Dict, Optional, Sequence

from ._config import MAX_DEPTH, MAX_EVENT_BYTES
from ._version import __version__
from ._wire_event import Event
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
    "MAX_FUTURE_SKEW_S",
    "MAX_MESSAGE_ID_CHARS",
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


#: How far ahead of this machine's clock a caller's ``timestamp`` may be: clocks of the
#: machines that produced an event (and this one) drift, but an event from tomorrow is a bug.
MAX_FUTURE_SKEW_S = 24 * 3600.0
_EPOCH = _dt.datetime(1970, 1, 1)
_NO_TIME = _dt.timedelta(0)


def _caller_timestamp(value: Any) -> str:
    """``value`` (the caller's ``timestamp=``) in the wire form of :func:`now_timestamp`.

    A ``datetime.datetime`` only: an aware one is converted to UTC, a naive one is taken as
    UTC (the rule for datetime property values). From 1970-01-01T00:00:00Z to
    :data:`MAX_FUTURE_SKEW_S` ahead of now; anything else is a ValidationError. Milliseconds
    are truncated, as :func:`now_timestamp` truncates.
    """
    try:
        is_datetime = isinstance(value, _dt.datetime)
    except Exception:
        is_datetime = False
    if not is_datetime:
        raise ValidationError(
            f"timestamp must be a datetime.datetime (or None for now), not {_describe(value)}"
        )
    try:
        offset = value.utcoffset()  # None for a naive datetime: taken as UTC
        wall = _dt.datetime(
            value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond
        )
        # Differences of datetimes never overflow; a UTC instant out of datetime's range can.
        since_epoch = wall - _EPOCH - (offset if offset is not None else _NO_TIME)
        seconds = since_epoch.total_seconds()
    except Exception as exc:
        raise ValidationError(
            f"timestamp ({_describe(value)}) cannot be read: {_exception_text(exc)}"
        ) from None
    if since_epoch < _NO_TIME:
        raise ValidationError("timestamp is before 1970-01-01T00:00:00Z")
    if seconds > time.time() + MAX_FUTURE_SKEW_S:
        raise ValidationError(
            f"timestamp is more than {MAX_FUTURE_SKEW_S / 3600:g} hours in the future"
        )
    utc = _EPOCH + since_epoch
    return "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (
        utc.year, utc.month, utc.day, utc.hour, utc.minute, utc.second, utc.microsecond // 1000
    )


#: The longest ``message_id`` a caller may choose. A uuid is 36 characters, a ULID 26; the
#: ids other tools forward (prefixed uuids, hashes) fit with room to spare. A longer value is
#: almost surely something else passed by mistake, and ids are logged and used as
#: de-duplication keys, where a bound matters.
MAX_MESSAGE_ID_CHARS = 200
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")


def _caller_message_id(value: Any) -> str:
    """``value`` (the caller's ``message_id=``) as a JSON string, sent exactly as given.

    A non-empty ``str`` of at most :data:`MAX_MESSAGE_ID_CHARS` characters, valid Unicode,
    without control characters (they would corrupt the log lines and de-duplication keys
    that carry ids). Anything else is a ValidationError.
    """
    if type(value) is not str:
        try:
            is_text = isinstance(value, str)
        except Exception:
            is_text = False
        if not is_text:
            raise ValidationError(f"message_id must be a non-empty str, not {_describe(value)}")
        value = str.__str__(value)  # a str subclass: its value, never its own methods
    if not value:
        raise ValidationError("message_id must be a non-empty str")
    if len(value) > MAX_MESSAGE_ID_CHARS:
        raise ValidationError(
            f"message_id is {len(value)} characters long; the limit is {MAX_MESSAGE_ID_CHARS}"
        )
    if _CONTROL_CHARACTER.search(value):
        raise ValidationError("message_id contains a control character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError("message_id contains a lone surrogate (it is not valid Unicode)") from None
    return _c_quote(value)


def _head(kind: str, timestamp: Any, message_id: Any) -> str:
    """The start of an event of ``kind`` with the caller's timestamp and/or message id."""
    mid = f'"{new_message_id()}"' if message_id is None else _caller_message_id(message_id)
    ts = now_timestamp() if timestamp is None else _caller_timestamp(timestamp)
    return f'{{"type":"{kind}","messageId":{mid},"timestamp":"{ts}",'


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


#: The most digits a number may have (CPython's default limit for int-to-text conversion).
_MAX_NUMBER_DIGITS = 4300


def _default(value: Any) -> Any:
    """json's ``default`` hook: the documented conversions, or TypeError."""
    if isinstance(value, _dt.datetime):
        return _iso_datetime(value)
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        if not value.is_finite():
            raise ValueError("non-finite Decimal")
        if value != value.to_integral_value():
            return float(value)
        if value.adjusted() >= _MAX_NUMBER_DIGITS:  # int() of Decimal("1e999999999") never ends
            raise ValueError(f"a Decimal with more than {_MAX_NUMBER_DIGITS} digits")
        return int(value)
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


def _make_encoder(*, sort_keys: bool = False) -> Callable[[Any], str]:
    """The fastest compact, strict JSON encoder this Python offers.

    Prefer the C encoder built once, without a shared ``markers`` dict: it keeps no state
    between calls (so threads cannot disturb each other) and a cycle ends in RecursionError,
    which sends the value to the slow path that names the cycle. With ``sort_keys`` every
    object's keys come out sorted, and a dict that mixes str keys with others (``{1: "a",
    "1": "b"}``: the only kind whose keys can collide once stringified) raises TypeError.
    """
    fallback = json.JSONEncoder(
        ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_default, sort_keys=sort_keys
    ).encode
    maker = getattr(json.encoder, "c_make_encoder", None)
    quote = getattr(json.encoder, "c_encode_basestring", None)
    if maker is None or quote is None:
        return fallback
    try:
        c_encode = maker(None, _default, quote, None, ":", ",", sort_keys, False, False)
        c_encode({"probe": [1.5, None, True]}, 0)
    except Exception:
        return fallback
    join = "".join

    def encode(value: Any) -> str:
        return join(c_encode(value, 0))

    return encode


_encode = _make_encoder()
#: The fast path of properties and traits: sorted keys cost a few hundred nanoseconds and
#: make the C encoder itself refuse the one kind of dict whose keys could collide once
#: stringified (a str key beside a non-str one), instead of a walk over every nested dict.
_encode_properties = _make_encoder(sort_keys=True)


def _describe(value: Any) -> str:
    """The name of ``value``'s type, for messages; never runs the value's own code."""
    try:
        name = type(value).__qualname__
    except Exception:
        name = None
    return name if type(name) is str else "object"


def _exception_text(exc: BaseException) -> str:
    """``ExcType: message`` of an exception raised by user code, which may itself misbehave."""
    try:
        text = str(exc)
        text = text if type(text) is str else ""
    except Exception:
        text = ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{_describe(exc)}: {text}" if text else _describe(exc)


def _clip(path: str) -> str:
    return path if len(path) <= 120 else path[:60] + "..." + path[-50:]


def _child(path: str, key: str) -> str:
    """The path of ``key`` in the mapping at ``path``: ``properties.a``, or
    ``properties["a b"]`` for a key that is not a plain name."""
    if len(key) > 40:
        key = key[:37] + "..."
    if key.isidentifier():
        return f"{path}.{key}"
    return f"{path}[{_ascii_quote(key)}]"


def _plain_key(key: Any, path: str) -> str:
    """``key`` as the JSON object key the C encoder would make of it (str, int, float, bool,
    None), or ``str(key)``; a plain ``str`` in every case."""
    if type(key) is str:
        return key
    if isinstance(key, str):
        return str.__str__(key)
    if key is None:
        return "null"
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return int.__repr__(key)  # ValueError when too long to print: named by the caller
    if isinstance(key, float):
        if math.isfinite(key):
            return float.__repr__(key)
        return "NaN" if math.isnan(key) else ("Infinity" if key > 0 else "-Infinity")
    try:
        text = str(key)
        if not isinstance(text, str):
            raise TypeError("__str__ returned a non-string")
    except Exception as exc:
        raise ValidationError(
            f"{_clip(path)} has a key of type {_describe(key)} that cannot be turned into a string "
            f"({_exception_text(exc)})"
        ) from None
    return str.__str__(text)


def to_json_value(
    value: Any, path: str = "value", _depth: int = 0, _seen: frozenset[int] = frozenset()
) -> Any:
    """Return ``value`` as plain JSON data, or raise ValidationError naming where it is bad.

    This is the slow path, used only when the fast C encoder refused a value, to explain why
    (or to stringify keys it does not accept). Whatever a user object raises while it is read
    becomes a ValidationError naming its path; RecursionError passes through (the caller
    reports it as too deep), and so do BaseExceptions that are not Exceptions.
    """
    try:
        if value is None or type(value) in (str, bool):
            return value
        if isinstance(value, str):
            return str.__str__(value)
        if isinstance(value, int):
            int.__repr__(value)  # ValueError here, with the path, when it is too long to print
            return value
        if isinstance(value, float):
            if not math.isfinite(value):
                what = "NaN" if math.isnan(value) else "Infinity"
                raise ValidationError(f"{_clip(path)} is {what}; NaN and Infinity are not valid JSON")
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
                for key, item in list(value.items()):  # a snapshot: user code below may change it
                    skey = _plain_key(key, path)
                    if skey in out:
                        raise ValidationError(
                            f"{_clip(path)} has two keys that both become {_ascii_quote(skey[:40])}"
                        )
                    out[skey] = to_json_value(item, _child(path, skey), _depth + 1, seen)
                return out
            items = list(value)  # a snapshot, as for a mapping
            return [to_json_value(item, f"{path}[{i}]", _depth + 1, seen) for i, item in enumerate(items)]
        try:
            converted = _default(value)
        except _Unsupported:
            raise ValidationError(
                f"{_clip(path)} is of type {_describe(value)}, which klime cannot turn into JSON "
                "(convert it to a str, number, bool, None, list or dict)"
            ) from None
        return to_json_value(converted, path, _depth + 1, _seen | {id(value)})
    except (ValidationError, RecursionError):
        raise
    except Exception as exc:
        raise ValidationError(
            f"{_clip(path)} ({_describe(value)}) cannot be turned into JSON: {_exception_text(exc)}"
        ) from None


def _nested_too_deep(value: Any) -> bool:
    """Does what the C encoder accepted nest more than MAX_DEPTH levels? Iterative (no
    recursion limit); stops at the first level too deep. Runs user code (a Mapping's
    ``values()``), which may raise."""
    stack = [(value, 1)]
    pop = stack.pop
    push = stack.append
    while stack:
        item, depth = pop()
        if isinstance(item, Mapping):
            children: Any = item.values()
        elif isinstance(item, (list, tuple, set, frozenset)):
            children = item
        else:
            continue
        if depth > MAX_DEPTH:
            return True
        for child in children:
            if type(child) in _LEAVES:
                continue
            push((child, depth + 1))
    return False


_LEAVES = frozenset({str, int, float, bool, type(None)})

#: Each level of nesting takes at least two characters, so a shorter text is never too deep:
#: the depth is looked at only for longer ones (the C encoder's own limit differs from one
#: Python to the next; this one does not).
_LONG_TEXT = 2 * MAX_DEPTH


def _long_text_fits(value: Dict[Any, Any], text: str, what: str) -> bool:
    """May ``text``, the C encoder's JSON of ``value``, be sent as it is? A short one, yes;
    a long one unless ``value`` is nested too deep (ValidationError). False when user code
    misbehaved while looked at: the slow path then explains it."""
    if len(text) < _LONG_TEXT:
        return True
    try:
        too_deep = _nested_too_deep(value)
    except Exception:
        return False
    if too_deep:
        raise _too_deep(what)
    return True


def _too_deep(what: str) -> ValidationError:
    return ValidationError(f"{what} is nested more than {MAX_DEPTH} levels deep")


def _json_object(value: Any, what: str) -> str | None:
    """Encode properties/traits; None when absent or empty."""
    if type(value) is dict:
        if not value:
            return None
        try:
            # the fast path: one C-level pass that validates, keys sorted (a dict mixing
            # str and non-str keys raises TypeError: its keys may collide, see the slow path)
            text = _encode_properties(value)
        except Exception:
            pass  # the slow path below explains the problem precisely (or fixes keys)
        else:
            if _long_text_fits(value, text, what):
                return text
    elif value is None:
        return None
    else:
        try:
            is_mapping = isinstance(value, Mapping)
            empty = is_mapping and not value
        except Exception as exc:
            raise ValidationError(
                f"{what} ({_describe(value)}) cannot be read: {_exception_text(exc)}"
            ) from None
        if not is_mapping:
            raise ValidationError(f"{what} must be a dict, not {_describe(value)}")
        if empty:
            return None
    try:
        plain = to_json_value(value, what)
    except RecursionError:
        raise _too_deep(what) from None
    try:
        return _encode(plain)
    except RecursionError:
        raise _too_deep(what) from None
    except Exception as exc:  # plain data: should not happen, but never let it out
        raise ValidationError(f"{what} cannot be turned into JSON: {_exception_text(exc)}") from None


# ---------------------------------------------------------------------------------------
# ids and names


def _id(value: Any, name: str) -> str | None:
    if type(value) is str:
        if value:
            return value
        raise ValidationError(f"{name} must be a non-empty string")
    if value is None:
        return None
    try:
        is_text = isinstance(value, str)
        is_int = not is_text and isinstance(value, int) and not isinstance(value, bool)
    except Exception:  # a __class__ that raises
        is_text = is_int = False
    if is_text:  # a str subclass: its own methods (__str__, __len__) are not trusted
        text = str.__str__(value)
        if text:
            return text
        raise ValidationError(f"{name} must be a non-empty string")
    if is_int:
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


_CALLER_CHOICES_DOC = """
    ``timestamp`` (keyword-only): when the event happened, a ``datetime.datetime``; an aware
    one is converted to UTC, a naive one is taken as UTC; sent as UTC with milliseconds
    (truncated), e.g. ``2026-01-02T03:04:05.678Z``. None (the default) means now. Refused
    (ValidationError): anything that is not a datetime (a ``date`` is ambiguous, a str or a
    number is not parsed), an instant before 1970-01-01T00:00:00Z, or one more than
    :data:`MAX_FUTURE_SKEW_S` (24 hours) ahead of this machine's clock.

    ``message_id`` (keyword-only): the event's ``messageId``, sent exactly as given, so that
    an event re-imported or re-sent under the id it already had is recognised as the same
    event. A non-empty ``str`` of at most :data:`MAX_MESSAGE_ID_CHARS` characters, valid
    Unicode, without control characters; anything else is a ValidationError. None (the
    default) means a new random uuid4.
"""


def encode_track(
    event: Any,
    properties: Properties,
    user_id: Any,
    group_id: Any,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
) -> bytes:
    """Validate and encode a ``track`` event. Raises ValidationError (and nothing else).

    Does not block; thread-safe.
    """
    if type(event) is not str or not event:
        event = _event_name(event)
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
    if timestamp is None and message_id is None:  # the hot path: one f-string
        return _finish(
            f'{{"type":"track","messageId":"{new_message_id()}","timestamp":"{now_timestamp()}",'
            f'"event":{_c_quote(event)}{ids}{tail}'
        )
    return _finish(f'{_head("track", timestamp, message_id)}"event":{_c_quote(event)}{ids}{tail}')


def encode_identify(
    user_id: Any,
    traits: Properties,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
) -> bytes:
    """Validate and encode an ``identify`` event. Raises ValidationError (and nothing else).

    Does not block; thread-safe.
    """
    uid = _required_id(user_id, "user_id")
    body = _json_object(traits, "traits")
    tail = _TAIL if body is None else f',"traits":{body}{_TAIL}'
    if timestamp is None and message_id is None:
        return _finish(
            f'{{"type":"identify","messageId":"{new_message_id()}","timestamp":"{now_timestamp()}",'
            f'"userId":{_c_quote(uid)}{tail}'
        )
    return _finish(f'{_head("identify", timestamp, message_id)}"userId":{_c_quote(uid)}{tail}')


def encode_group(
    group_id: Any,
    traits: Properties,
    user_id: Any,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
) -> bytes:
    """Validate and encode a ``group`` event. Raises ValidationError (and nothing else).

    Does not block; thread-safe.
    """
    gid = _required_id(group_id, "group_id")
    uid = _id(user_id, "user_id")
    body = _json_object(traits, "traits")
    user = "" if uid is None else f',"userId":{_c_quote(uid)}'
    tail = _TAIL if body is None else f',"traits":{body}{_TAIL}'
    if timestamp is None and message_id is None:
        return _finish(
            f'{{"type":"group","messageId":"{new_message_id()}","timestamp":"{now_timestamp()}",'
            f'"groupId":{_c_quote(gid)}{user}{tail}'
        )
    return _finish(f'{_head("group", timestamp, message_id)}"groupId":{_c_quote(gid)}{user}{tail}')


for _encoder in (encode_track, encode_identify, encode_group):
    _encoder.__doc__ = (_encoder.__doc__ or "") + _CALLER_CHOICES_DOC
del _encoder


def _event_name(value: Any) -> str:
    """A str subclass's value as the event name; anything else (or empty) is refused."""
    try:
        is_text = isinstance(value, str)
    except Exception:  # a __class__ that raises
        is_text = False
    if is_text:
        text = str.__str__(value)  # its own __str__/__len__ are not trusted
        if text:
            return text
    raise ValidationError(f"event name must be a non-empty string, not {_short(value)}")


_SHOWN_AS_IS = (str, bytes, int, float, bool, type(None))


def _short(value: Any) -> str:
    """A short text for ``value`` in a message: the value of a built-in scalar, else its type.
    Never runs the value's own ``__repr__``."""
    if type(value) in _SHOWN_AS_IS:
        try:
            text = repr(value[:60] if type(value) in (str, bytes) else value)
        except ValueError:  # an int too long to print
            text = "a very large int"
    else:
        text = f"a {_describe(value)}"
    return text if len(text) <= 60 else text[:57] + "..."


def decode(raw: bytes) -> dict[str, Any]:
    """The wire dict of one encoded event."""
    result: dict[str, Any] = json.loads(raw)
    return result


def decode_all(events: Sequence[bytes]) -> list[Event]:
    """The wire dicts of encoded events, in order, as the :class:`~klime.types.Event`
    objects handed to ``on_error`` and ``SendError.events``. Pure."""
    return [Event(json.loads(raw)) for raw in events]


#: Bytes after ``"messageId":`` that always hold the whole id: its JSON string of at most
#: MAX_MESSAGE_ID_CHARS characters (each at most 6 bytes escaped, 4 in UTF-8) and quotes.
_MESSAGE_ID_WINDOW = 6 * MAX_MESSAGE_ID_CHARS + 2
_raw_decode = json.JSONDecoder().raw_decode


def message_id(raw: bytes) -> str:
    """The messageId of an encoded event (they all start with type then messageId): a
    uuid4 of klime's, or the caller's own ``message_id``. Raises ValueError when ``raw``
    has none. Thread-safe."""
    start = raw.index(b'"messageId":"') + 12
    window = raw[start : start + _MESSAGE_ID_WINDOW].decode("utf-8", "ignore")
    value, _ = _raw_decode(window)  # the JSON string; what follows it is ignored
    if type(value) is not str:
        raise ValueError("the event's messageId is not a string")
    return value
