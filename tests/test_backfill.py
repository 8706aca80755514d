"""History import (klime._backfill and the _import_ modules it runs on): formats, ids,
timestamps, rejects, dry runs, stopping and resuming, against a real collector on 127.0.0.1."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import WRITE_KEY
from klime._backfill import Importer, backfill, import_files
from klime._import_formats import Malformed, Record, derived_message_id, encode_record, normalize_timestamp
from klime._import_sources import IterableInput
from klime.devserver import Collector, Fault
from klime.errors import ConfigurationError
from klime.senders.http import HttpSender


def write_ndjson(path: Path, rows: List[Any], gz: bool = False) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def orders(n: int, start: int = 0) -> List[Dict[str, Any]]:
    return [
        {
            "type": "track",
            "event": "Order Completed",
            "userId": f"u{i % 13}",
            "timestamp": f"2024-02-{1 + i % 28:02d}T10:{i % 60:02d}:00+02:00",
            "properties": {"order": i, "revenue": i * 1.5},
        }
        for i in range(start, start + n)
    ]


def fast_sender(collector: Collector, attempts: int = 2) -> HttpSender:
    return HttpSender(WRITE_KEY, collector.url, retry_max_attempts=attempts, retry_initial_delay=10)


# ------------------------------------------------------------------------------ the encoding


def test_timestamps_are_normalised_to_utc_milliseconds() -> None:
    assert normalize_timestamp("2024-03-01T12:34:56.789Z") == "2024-03-01T12:34:56.789Z"
    assert normalize_timestamp("2024-03-01T14:34:56+02:00") == "2024-03-01T12:34:56.000Z"
    assert normalize_timestamp("2024-03-01 12:34:56.123456") == "2024-03-01T12:34:56.123Z"  # naive: UTC
    assert normalize_timestamp(1709296496) == "2024-03-01T12:34:56.000Z"  # Unix seconds
    assert normalize_timestamp(1709296496789) == "2024-03-01T12:34:56.789Z"  # milliseconds
    assert normalize_timestamp(dt.date(2024, 3, 1)) == "2024-03-01T00:00:00.000Z"
    for bad in (None, "yesterday", True, [], float("nan"), "2024-13-01T00:00:00Z"):
        with pytest.raises(Malformed):
            normalize_timestamp(bad)


def test_an_event_keeps_its_timestamp_and_gets_a_deterministic_id() -> None:
    record = Record("track", "Signed Up", "u1", None, {"b": 2, "a": 1}, "2024-01-01T00:00:00Z", None)
    raw, mid = encode_record(record)
    wire = json.loads(raw)
    assert wire["timestamp"] == "2024-01-01T00:00:00.000Z"
    assert wire["messageId"] == mid == derived_message_id(record, "2024-01-01T00:00:00.000Z")
    assert wire["context"]["library"]["name"] == "python-sdk"
    # the same event spelled differently (key order, timestamp precision) has the same id
    same = record._replace(payload={"a": 1, "b": 2}, timestamp="2024-01-01T00:00:00.000+00:00")
    assert encode_record(same)[1] == mid
    assert encode_record(record._replace(user_id="u2"))[1] != mid
    # an id the event carries is kept, whatever it looks like
    raw, mid = encode_record(record._replace(message_id="segment-abc-1"))
    assert mid == "segment-abc-1" and json.loads(raw)["messageId"] == "segment-abc-1"


def test_the_client_rules_apply() -> None:
    base = Record("track", "E", "u1", None, None, "2024-01-01T00:00:00Z", None)
    for bad in (
        base._replace(event=""),
        base._replace(user_id=None),
        base._replace(payload=[1]),
        base._replace(kind="page"),
        base._replace(payload={"blob": "x" * 210_000}),
        Record("identify", None, None, None, None, "2024-01-01T00:00:00Z", None),
    ):
        with pytest.raises(Malformed):
            encode_record(bad)


# ------------------------------------------------------------------------------ formats, sent


def test_klime_lines_all_arrive_once_and_a_second_import_repeats_the_ids(
    tmp_path: Path, collector: Collector
) -> None:
    path = write_ndjson(tmp_path / "orders.ndjson", orders(1234))
    first = import_files([str(path)], sender=fast_sender(collector))
    assert (first.lines, first.events, first.sent, first.malformed) == (1234, 1234, 1234, 0)
    assert first.complete and first.requests == 13  # batches of up to 100
    ids = collector.message_ids()
    assert len(set(ids)) == 1234
    first_order = next(e for e in collector.events() if e["properties"]["order"] == 0)
    assert first_order["timestamp"] == "2024-02-01T08:00:00.000Z"  # 10:00 at +02:00
    second = import_files([str(path)], sender=fast_sender(collector))
    assert second.sent == 1234
    assert sorted(collector.message_ids()[1234:]) == sorted(ids)  # the same ids: Klime keeps one of each


def test_segment_export(tmp_path: Path, collector: Collector) -> None:
    ts = "2024-01-05T10:00:00.000Z"
    rows = [
        {
            "type": "track",
            "event": "Signed Up",
            "userId": "u1",
            "timestamp": ts,
            "messageId": "m1",
            "properties": {"plan": "pro"},
            "context": {"groupId": "acme"},
        },
        {
            "type": "identify",
            "userId": "u1",
            "traits": {"email": "a@x.io"},
            "timestamp": ts,
            "messageId": "m2",
            "context": {"groupId": "acme"},
        },
        {
            "type": "group",
            "groupId": "acme",
            "userId": "u1",
            "traits": {"name": "Acme"},
            "originalTimestamp": ts,
            "messageId": "m3",
        },
        {"type": "page", "userId": "u1", "timestamp": ts, "messageId": "m4"},
        {"type": "track", "event": "Viewed", "anonymousId": "anon-1", "timestamp": ts, "messageId": "m5"},
    ]
    path = write_ndjson(tmp_path / "segment.ndjson", rows)
    result = import_files([str(path)], format="segment", sender=fast_sender(collector))
    assert (result.lines, result.events, result.sent, result.skipped) == (5, 4, 4, 2)
    assert result.skip_reasons == {"a page call": 1, "only an anonymousId": 1}
    got = {e["messageId"]: e for e in collector.events()}
    assert set(got) == {"m1", "m2", "m2:group", "m3"}
    assert got["m1"]["groupId"] == "acme" and got["m1"]["properties"] == {"plan": "pro"}
    assert got["m2"]["type"] == "identify" and got["m2"]["traits"] == {"email": "a@x.io"}
    assert got["m2:group"] == {**got["m2:group"], "type": "group", "groupId": "acme", "userId": "u1"}
    assert got["m3"]["timestamp"] == ts and got["m3"]["traits"] == {"name": "Acme"}


def test_csv_database_export(tmp_path: Path, collector: Collector) -> None:
    path = tmp_path / "orders.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["event", "user_id", "group_id", "timestamp", "message_id", "amount", "note", "vip"])
        out.writerow(["Order", "u1", "g1", "2024-01-01 09:00:00", "", "12.5", "two\nlines", "true"])
        out.writerow(["Order", "u2", "", "2024-01-02T09:00:00Z", "row-2", "007", "", "false"])
        out.writerow(["", "u3", "", "2024-01-03T09:00:00Z", "", "1", "", ""])  # no event name
    result = import_files([str(path)], format="csv", sender=fast_sender(collector))
    assert (result.events, result.sent, result.malformed) == (2, 2, 1)
    first, second = collector.events()
    assert first["properties"] == {"amount": 12.5, "note": "two\nlines", "vip": True}
    assert first["groupId"] == "g1" and first["timestamp"] == "2024-01-01T09:00:00.000Z"
    assert second["messageId"] == "row-2" and second["properties"] == {"amount": "007", "vip": False}


def test_mixpanel_and_posthog_exports(collector: Collector) -> None:
    mixpanel = [
        {
            "event": "Purchase",
            "properties": {"time": 1704067200, "distinct_id": "u1", "$insert_id": "mp1", "price": 9},
        },
        {"event": "$identify", "properties": {"time": 1704067200, "distinct_id": "u1"}},
        {"event": "Visit", "properties": {"time": 1704067200, "distinct_id": "$device:abc"}},
        {"$distinct_id": "u1", "$properties": {"$email": "a@x.io", "$last_seen": "2024-01-01T00:00:00"}},
    ]
    result = backfill(mixpanel, format="mixpanel", write_key=WRITE_KEY, endpoint=collector.url)
    assert (result.sent, result.skipped) == (2, 2)
    purchase, profile = collector.events()
    assert purchase["messageId"] == "mp1" and purchase["properties"] == {"price": 9}
    assert purchase["timestamp"] == "2024-01-01T00:00:00.000Z"
    assert profile["type"] == "identify" and profile["traits"]["$email"] == "a@x.io"
    collector.reset()
    posthog = [
        {
            "event": "report exported",
            "distinct_id": "u1",
            "uuid": "ph1",
            "timestamp": "2024-01-01T00:00:00Z",
            "properties": {"format": "pdf", "$groups": {"company": "acme"}, "$set": {"x": 1}},
        },
        {
            "event": "$identify",
            "distinct_id": "u1",
            "uuid": "ph2",
            "timestamp": "2024-01-01T00:00:00Z",
            "properties": {"$set": {"email": "a@x.io"}},
        },
        {
            "event": "$groupidentify",
            "distinct_id": "u1",
            "uuid": "ph3",
            "timestamp": "2024-01-01T00:00:00Z",
            "properties": {"$group_type": "company", "$group_key": "acme", "$group_set": {"name": "Acme"}},
        },
        {"event": "$pageview", "distinct_id": "u1", "uuid": "ph4", "timestamp": "2024-01-01T00:00:00Z"},
    ]
    result = backfill(posthog, format="posthog", write_key=WRITE_KEY, endpoint=collector.url)
    assert (result.sent, result.skipped) == (3, 1)
    got = {e["messageId"]: e for e in collector.events()}
    assert got["ph1"]["groupId"] == "acme" and got["ph1"]["properties"] == {"format": "pdf"}
    assert got["ph2"]["traits"] == {"email": "a@x.io"}
    assert got["ph3"]["type"] == "group" and got["ph3"]["traits"] == {"name": "Acme"}


# ------------------------------------------------------------------------------ bad lines, rejects


def test_malformed_lines_are_reported_with_their_line_and_skipped(
    tmp_path: Path, collector: Collector
) -> None:
    rows: List[Any] = [
        *orders(2),
        "{not json",
        {"type": "track", "event": "E", "userId": "u1"},
        "[1, 2]",
        "",
        *orders(1, 2),
    ]
    path = write_ndjson(tmp_path / "mixed.ndjson", rows)
    seen: List[Any] = []
    result = import_files([str(path)], sender=fast_sender(collector), on_malformed=lambda *a: seen.append(a))
    assert (result.lines, result.events, result.sent, result.malformed) == (7, 3, 3, 3)
    assert [(label, line) for label, line, _ in seen] == [(str(path), 3), (str(path), 4), (str(path), 5)]
    assert "not valid JSON" in seen[0][2] and "no timestamp" in seen[1][2]


def test_rejections_go_to_the_rejects_file_which_imports_again(tmp_path: Path, collector: Collector) -> None:
    path = write_ndjson(tmp_path / "orders.ndjson", orders(250))
    rejects = tmp_path / "rejects.ndjson"
    collector.respond(Fault.partial(0, 7), Fault.status_code(400))  # batch 1: two events; batch 2: all 100
    result = import_files([str(path)], sender=fast_sender(collector), rejects=str(rejects), concurrency=1)
    assert (result.sent, result.rejected, result.failed) == (148, 102, 0)
    assert result.events == result.sent + result.rejected + result.failed + result.unsent
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert len(lines) == 102
    assert lines[0]["_rejected"]["code"] == "injected_failure" and lines[0]["properties"]["order"] == 0
    assert lines[2]["_rejected"]["status"] == 400 and "HTTP 400" in lines[2]["_rejected"]["reason"]
    again = import_files([str(rejects)], sender=fast_sender(collector))
    assert again.sent == 102 and again.malformed == 0
    assert len(set(collector.message_ids())) == 250


def test_dry_run_validates_and_counts_without_a_key_or_a_request(
    tmp_path: Path, collector: Collector
) -> None:
    path = write_ndjson(tmp_path / "orders.ndjson", [*orders(300), "oops"])
    result = import_files([str(path)], dry_run=True, checkpoint=str(tmp_path / "ckpt"))
    assert (result.lines, result.events, result.sent, result.malformed, result.dry_run) == (
        301,
        300,
        0,
        1,
        True,
    )
    assert not (tmp_path / "ckpt").exists() and collector.requests() == []


# ------------------------------------------------------------------------------ stop and resume


def test_a_refused_key_stops_the_import_and_the_checkpoint_resumes_it(
    tmp_path: Path, collector: Collector
) -> None:
    path = write_ndjson(tmp_path / "orders.ndjson.gz", orders(1000), gz=True)
    ckpt = tmp_path / "import.ckpt"
    collector.respond(Fault.slow(0), Fault.slow(0), Fault.slow(0), Fault.status_code(401))
    first = import_files([str(path)], sender=fast_sender(collector), checkpoint=str(ckpt), concurrency=1)
    assert first.sent == 300 and first.failed == 100 and first.stopped and "401" in first.stopped
    assert first.events == first.sent + first.rejected + first.failed + first.unsent
    saved = json.loads(ckpt.read_text())["inputs"][0]
    assert (saved["line"], saved["done"]) == (300, False)
    second = import_files([str(path)], sender=fast_sender(collector), checkpoint=str(ckpt), concurrency=1)
    assert second.complete and second.lines == 700 and second.resumed_inputs == 1
    ids = collector.message_ids()
    assert len(set(ids)) == 1000 and len(ids) == 1000  # nothing settled was sent again
    assert json.loads(ckpt.read_text())["inputs"][0]["done"] is True
    third = import_files([str(path)], sender=fast_sender(collector), checkpoint=str(ckpt))
    assert third.lines == 0 and len(collector.message_ids()) == 1000


def test_a_checkpoint_is_not_used_for_another_file(tmp_path: Path, collector: Collector) -> None:
    path = write_ndjson(tmp_path / "orders.ndjson", orders(10))
    ckpt = str(tmp_path / "ckpt")
    import_files([str(path)], sender=fast_sender(collector), checkpoint=ckpt)
    write_ndjson(path, orders(11))
    with pytest.raises(ConfigurationError, match="not the file the checkpoint"):
        import_files([str(path)], sender=fast_sender(collector), checkpoint=ckpt)
    with pytest.raises(ConfigurationError, match="format"):
        import_files([str(path)], format="segment", sender=fast_sender(collector), checkpoint=ckpt)


def test_a_generator_resumes_after_the_items_already_settled(tmp_path: Path, collector: Collector) -> None:
    ckpt = str(tmp_path / "ckpt")
    collector.respond(Fault.slow(0), Fault.slow(0), Fault.status_code(503), Fault.status_code(503))
    importer = Importer(sender=fast_sender(collector, attempts=2), checkpoint=ckpt, concurrency=1)
    stopped = importer.run([IterableInput(iter(orders(500)))], "klime")
    assert stopped.sent == 200 and stopped.stopped and "503" in stopped.stopped
    resumed = backfill(iter(orders(500)), write_key=WRITE_KEY, endpoint=collector.url, checkpoint=ckpt)
    assert resumed.complete and resumed.lines == 300 and resumed.sent == 300
    assert len(set(collector.message_ids())) == 500


def test_the_window_bounds_what_is_in_flight(tmp_path: Path, collector: Collector) -> None:
    path = write_ndjson(tmp_path / "orders.ndjson", orders(2000))
    collector.set_mode(Fault.slow(0.05))
    result = import_files(
        [str(path)], sender=fast_sender(collector), concurrency=4, checkpoint=str(tmp_path / "c")
    )
    assert result.sent == 2000 and 1 <= collector.peak_in_flight <= 4
