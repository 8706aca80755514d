"""History import: turning one line (or mapping) of an export into Klime wire events.

The formats ``klime`` (wire events), ``segment`` (Segment-spec events), ``csv`` (a database
export with a header row), ``mixpanel`` (its raw-event and people-profile exports) and
``posthog`` (its event export) are each a function from one parsed record to a list of
:class:`Record` (usually one; a Segment ``identify`` that names a ``context.groupId`` gives an
``identify`` and a ``group``). A record that is not valid raises :class:`Malformed`; one that
is valid but cannot become a Klime event (a ``page`` call, only an ``anonymousId``) raises
:class:`Unmappable`. :func:`encode_record` validates a record with the encoder of
:mod:`klime._events` (the rules of ``Client.track``/``identify``/``group``), sets its own
timestamp (normalised to UTC milliseconds) and its messageId (the one it carries, or a
deterministic one: :func:`derived_message_id`) and returns the wire bytes.

May import: the model (:mod:`klime._events`, :mod:`klime._config`, errors) and the standard
library. Thread-safe: no state.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import uuid
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

from ._events import encode_group, encode_identify, encode_track, to_json_value
from .errors import ValidationError

__all__ = [
    "FORMATS",
    "Malformed",
    "Record",
    "Unmappable",
    "csv_row",
    "derived_message_id",
    "encode_record",
    "normalize_timestamp",
]

#: The namespace of the deterministic messageIds (uuid5). Never change it: ids of events
#: imported before would change, and a re-import would duplicate them.
IMPORT_NAMESPACE = uuid.UUID("5b1f0c2e-8a43-5d6e-9c71-4b0e2d7a9f13")
_NAMESPACE_BYTES = IMPORT_NAMESPACE.bytes
_VARIANT = "89ab89ab89ab89ab"


class Malformed(ValueError):
    """The line is not a valid event of its format (its message says why)."""


class Unmappable(Exception):
    """The line is valid but cannot become a Klime event (its message says why)."""


class Record(NamedTuple):
    """One Klime event before encoding: ``payload`` is properties (track) or traits."""

    kind: str
    event: Any
    user_id: Any
    group_id: Any
    payload: Any
    timestamp: Any
    message_id: Any


# ---------------------------------------------------------------------------------------
# timestamps


def _format_utc(value: _dt.datetime) -> str:
    if value.tzinfo is None:  # no offset given: taken as UTC (documented)
        value = value.replace(tzinfo=_dt.UTC)
    value = value.astimezone(_dt.UTC)
    if not 1970 <= value.year <= 9999:
        raise Malformed(f"timestamp {value.isoformat()} is before 1970")
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + "%03dZ" % (value.microsecond // 1000)


def normalize_timestamp(value: Any) -> str:
    """``value`` as Klime's wire timestamp, ``YYYY-MM-DDTHH:MM:SS.mmmZ`` in UTC.

    Accepts an ISO 8601 string (any precision, ``Z`` or an offset; without one it is UTC),
    a :class:`datetime.datetime` (naive = UTC), a :class:`datetime.date`, or a number of
    Unix seconds (numbers above 1e11 are taken as milliseconds, as Mixpanel's import API
    sends them). Raises :class:`Malformed` for anything else or nothing at all.
    """
    if isinstance(value, str):
        text = value.strip()
        if len(text) == 24 and text[10] == "T" and text[19] == "." and text[23] == "Z":
            try:  # the wire form already (the common case): only check it is a real time
                _dt.datetime.fromisoformat(text[:23])
                return text
            except ValueError:
                pass
        try:
            parsed = _dt.datetime.fromisoformat(text.replace(" UTC", "Z"))
        except ValueError:
            raise Malformed(f"timestamp {value[:40]!r} is not an ISO 8601 time") from None
        return _format_utc(parsed)
    if isinstance(value, _dt.datetime):
        return _format_utc(value)
    if isinstance(value, _dt.date):
        return _format_utc(_dt.datetime(value.year, value.month, value.day))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
        if not math.isfinite(seconds) or seconds < 0:
            raise Malformed(f"timestamp {value!r} is not a Unix time")
        if seconds > 1e11:
            seconds /= 1000.0
        try:
            moment = _dt.datetime.fromtimestamp(seconds, _dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise Malformed(f"timestamp {value!r} is out of range") from None
        return _format_utc(moment)
    if value is None:
        raise Malformed("no timestamp (a history import needs each event's own time)")
    raise Malformed(f"timestamp must be a string or a number, not {type(value).__name__}")


# ---------------------------------------------------------------------------------------
# message ids and encoding

_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=to_json_value
).encode


def derived_message_id(record: Record, timestamp: str) -> str:
    """The deterministic messageId of an event that carries none: uuid5 (namespace
    :data:`IMPORT_NAMESPACE`) over the canonical JSON (sorted keys) of its type, name, ids,
    normalised timestamp and properties/traits. Identical events get the same id."""
    canonical = _canonical(
        [record.kind, record.event, record.user_id, record.group_id, timestamp, record.payload]
    )
    h = hashlib.sha1(_NAMESPACE_BYTES + canonical.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[int(h[16], 16)]}{h[17:20]}-{h[20:32]}"


def _given_id(value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Malformed(f"messageId must be a string, not {type(value).__name__}")


def encode_record(record: Record) -> tuple[bytes, str]:
    """Validate ``record`` as ``Client.track``/``identify``/``group`` would, and return its
    wire bytes (its own timestamp and messageId set) and its messageId. Raises
    :class:`Malformed` (a :class:`~klime.ValidationError`'s message included)."""
    timestamp = normalize_timestamp(record.timestamp)
    # the wire form has millisecond precision: the same instant, as the encoder takes it
    moment = _dt.datetime.fromisoformat(timestamp[:23]).replace(tzinfo=_dt.UTC)
    try:
        mid = _given_id(record.message_id) or derived_message_id(record, timestamp)
        if record.kind == "track":
            out = encode_track(
                record.event,
                record.payload,
                record.user_id,
                record.group_id,
                timestamp=moment,
                message_id=mid,
            )
        elif record.kind == "identify":
            out = encode_identify(record.user_id, record.payload, timestamp=moment, message_id=mid)
        elif record.kind == "group":
            out = encode_group(
                record.group_id, record.payload, record.user_id, timestamp=moment, message_id=mid
            )
        else:
            raise Malformed(f'type must be "track", "identify" or "group", not {str(record.kind)[:40]!r}')
    except ValidationError as exc:
        raise Malformed(str(exc)) from None
    except (TypeError, ValueError, RecursionError) as exc:  # the canonical JSON of the id
        raise Malformed(f"the event cannot be turned into JSON: {exc}") from None
    return out, mid


# ---------------------------------------------------------------------------------------
# formats


def _get(data: Mapping[str, Any], camel: str, snake: str) -> Any:
    value = data.get(camel)
    return data.get(snake) if value is None else value


def _object(value: Any, what: str) -> Any:
    if value is None or isinstance(value, Mapping):
        return value
    raise Malformed(f"{what} must be a JSON object, not {type(value).__name__}")


def _need_mapping(data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise Malformed(f"a line must be a JSON object, not {type(data).__name__}")
    return data


def klime_record(data: Any) -> List[Record]:
    """A Klime wire event (``type`` defaults to track; ``user_id``-style keys accepted too).
    Keys the wire does not know (a rejects file's ``_rejected``) are ignored."""
    data = _need_mapping(data)
    kind = data.get("type") or "track"
    payload = data.get("traits") if kind != "track" else data.get("properties")
    return [
        Record(
            kind,
            data.get("event"),
            _get(data, "userId", "user_id"),
            _get(data, "groupId", "group_id"),
            _object(payload, "traits" if kind != "track" else "properties"),
            data.get("timestamp"),
            _get(data, "messageId", "message_id"),
        )
    ]


_SEGMENT_SKIPPED = {"page": "a page call", "screen": "a screen call", "alias": "an alias call"}


def segment_record(data: Any) -> List[Record]:
    """A Segment-spec event: track, identify and group; ``context.groupId`` is a track's group
    when it has none, and links an identify's user to that group (a second, group event)."""
    data = _need_mapping(data)
    kind = data.get("type")
    if isinstance(kind, str) and kind in _SEGMENT_SKIPPED:
        raise Unmappable(_SEGMENT_SKIPPED[kind])
    if kind not in ("track", "identify", "group"):
        raise Malformed(f"unknown Segment type {str(kind)[:40]!r}")
    user_id = data.get("userId")
    context = _object(data.get("context"), "context") or {}
    context_group = context.get("groupId")
    anonymous = Unmappable("only an anonymousId" if data.get("anonymousId") else "no userId")
    if kind == "identify" and user_id in (None, ""):
        raise anonymous
    if kind == "track" and user_id in (None, "") and not (data.get("groupId") or context_group):
        raise anonymous
    timestamp = data.get("timestamp") or data.get("originalTimestamp") or data.get("receivedAt")
    message_id = data.get("messageId")
    if kind == "track":
        group_id = data.get("groupId") or context_group
        return [
            Record(
                "track",
                data.get("event"),
                user_id,
                group_id,
                _object(data.get("properties"), "properties"),
                timestamp,
                message_id,
            )
        ]
    traits = _object(data.get("traits"), "traits")
    if kind == "group":
        return [Record("group", None, user_id, data.get("groupId"), traits, timestamp, message_id)]
    records = [Record("identify", None, user_id, None, traits, timestamp, message_id)]
    if context_group not in (None, ""):
        link_id = None if message_id in (None, "") else f"{message_id}:group"
        records.append(Record("group", None, user_id, context_group, None, timestamp, link_id))
    return records


_MIXPANEL_MAPPED = ("time", "distinct_id", "$insert_id", "$user_id", "$device_id", "mp_processing_time_ms")


def mixpanel_record(data: Any) -> List[Record]:
    """Mixpanel's raw export (``{"event", "properties": {"time", "distinct_id", "$insert_id",
    ...}}``: a track) or its people export (``{"$distinct_id", "$properties"}``: an identify).
    Mixpanel's own ``$``-events (``$identify``, ``$merge``, ``$create_alias``, ...) are skipped;
    a ``distinct_id`` of ``$device:...`` is an anonymous device."""
    data = _need_mapping(data)
    if "$distinct_id" in data and "event" not in data:
        traits = _object(data.get("$properties"), "$properties") or {}
        timestamp = traits.get("$last_seen")
        return [Record("identify", None, data.get("$distinct_id"), None, traits, timestamp, None)]
    name = data.get("event")
    props = _object(data.get("properties"), "properties") or {}
    if isinstance(name, str) and name.startswith("$") and name not in ("$signup",):
        raise Unmappable(f"Mixpanel's own event {name[:40]}")
    user_id = props.get("$user_id") or props.get("distinct_id")
    if user_id in (None, "") or (isinstance(user_id, str) and user_id.startswith("$device:")):
        raise Unmappable("only an anonymous device id")
    properties = {k: v for k, v in props.items() if k not in _MIXPANEL_MAPPED}
    return [Record("track", name, user_id, None, properties, props.get("time"), props.get("$insert_id"))]


_POSTHOG_DROPPED = ("$set", "$set_once", "$groups", "$group_type", "$group_key", "$group_set")


def _posthog_properties(data: Mapping[str, Any]) -> Dict[str, Any]:
    props = data.get("properties")
    if isinstance(props, str):  # a ClickHouse export keeps properties as JSON text
        try:
            props = json.loads(props)
        except ValueError:
            raise Malformed("properties is a string that is not JSON") from None
    return dict(_object(props, "properties") or {})


def posthog_record(data: Any) -> List[Record]:
    """PostHog's event export (``event``, ``distinct_id``, ``properties``, ``timestamp``,
    ``uuid``): custom events become tracks (``$groups`` with one group gives the groupId),
    ``$identify`` an identify (traits from ``$set``), ``$groupidentify`` a group. Page views
    and PostHog's other ``$`` events are skipped."""
    data = _need_mapping(data)
    name = data.get("event")
    props = _posthog_properties(data)
    user_id = data.get("distinct_id") or props.get("distinct_id")
    timestamp = data.get("timestamp") or props.get("$time")
    message_id = data.get("uuid")
    if name == "$groupidentify":
        traits = _object(props.get("$group_set"), "$group_set")
        return [Record("group", None, None, props.get("$group_key"), traits, timestamp, message_id)]
    if user_id in (None, "") or props.get("$process_person_profile") is False:
        raise Unmappable("an anonymous event")
    if name == "$identify":
        return [
            Record("identify", None, user_id, None, _object(props.get("$set"), "$set"), timestamp, message_id)
        ]
    if isinstance(name, str) and name.startswith("$"):
        raise Unmappable(
            "a page view" if name in ("$pageview", "$pageleave", "$screen") else f"PostHog's own {name[:40]}"
        )
    groups = props.get("$groups")
    group_id = next(iter(groups.values())) if isinstance(groups, Mapping) and len(groups) == 1 else None
    properties = {k: v for k, v in props.items() if k not in _POSTHOG_DROPPED}
    return [Record("track", name, user_id, group_id, properties, timestamp, message_id)]


def _cell(text: str) -> Any:
    """A CSV property cell: JSON when it parses (``3``, ``true``, ``{"a":1}``), else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


_CSV_COLUMNS = ("type", "event", "user_id", "group_id", "timestamp", "message_id")


def csv_row(row: Mapping[str, Optional[str]]) -> List[Record]:
    """One row of a CSV export (``csv.DictReader``): ``event,user_id,group_id,timestamp,
    message_id`` (``type`` optional, default track) and any other column is a property (a
    trait for identify/group); empty cells are left out, a cell that parses as JSON is JSON."""

    def field(name: str) -> Optional[str]:
        value = row.get(name)
        return value if value else None

    extra = {k: _cell(v) for k, v in row.items() if k not in _CSV_COLUMNS and k and v not in (None, "")}
    kind = field("type") or "track"
    return [
        Record(
            kind,
            field("event"),
            field("user_id"),
            field("group_id"),
            extra,
            field("timestamp"),
            field("message_id"),
        )
    ]


#: The mapping formats by name (``csv`` is read by :func:`csv_row` from a DictReader).
FORMATS: Dict[str, Callable[[Any], List[Record]]] = {
    "klime": klime_record,
    "segment": segment_record,
    "mixpanel": mixpanel_record,
    "posthog": posthog_record,
}
