"""Tests for klime.devserver, the local Klime-compatible collector.

Only the standard library talks to it here (http.client, urllib): the SDK is tested against
this server elsewhere, so this file must not depend on it. Nothing sleeps and hopes: waits are
on conditions with deadlines.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from klime._config import MAX_BATCH_EVENTS, MAX_EVENT_BYTES, MAX_REQUEST_BYTES
from klime.devserver import Collector, Fault, RecordedRequest

KEY = "test-write-key"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"}
SRC = str(Path(__file__).resolve().parents[1] / "src")

Response = tuple[int, dict[str, str], bytes]


def track(i: int = 0, **extra: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "type": "track",
        "messageId": f"msg-{i}",
        "timestamp": "2024-05-01T07:21:03.120Z",
        "event": "Button Clicked",
        "userId": "user_123",
        "properties": {"plan": "pro"},
    }
    event.update(extra)
    return event


def batch_body(*events: dict[str, Any]) -> bytes:
    return json.dumps({"batch": list(events)}).encode()


def post(
    target: Collector | http.client.HTTPConnection,
    body: bytes | None = None,
    *,
    headers: dict[str, str] | None = None,
    path: str = "/v1/batch",
    method: str = "POST",
    timeout: float = 5.0,
) -> Response:
    """Send one request; a Collector gets a fresh connection, a connection is reused."""
    if isinstance(target, Collector):
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=timeout)
    else:
        conn = target
    try:
        conn.request(
            method,
            path,
            body=body if body is not None else batch_body(track()),
            headers=HEADERS if headers is None else headers,
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if isinstance(target, Collector):
            conn.close()


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c


# ---------------------------------------------------------------------------------------
# Normal behaviour
# ---------------------------------------------------------------------------------------


def test_accepts_a_batch_and_answers_the_documented_shape(collector: Collector) -> None:
    status, headers, body = post(collector, batch_body(track(0), track(1)))

    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert int(headers["Content-Length"]) == len(body)
    assert json.loads(body) == {"status": "ok", "accepted": 2, "failed": 0, "errors": []}
    assert collector.events() == [track(0), track(1)]
    assert collector.message_ids() == ["msg-0", "msg-1"]
    [request] = collector.requests()
    assert isinstance(request, RecordedRequest)
    assert (request.method, request.path, request.status, request.fault) == ("POST", "/v1/batch", 200, None)
    assert request.header("authorization") == f"Bearer {KEY}"
    assert request.json() == {"batch": [track(0), track(1)]}
    assert collector.url == f"http://127.0.0.1:{collector.port}"


def test_keep_alive_serves_two_requests_on_one_connection(collector: Collector) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        first = post(conn, batch_body(track(0)))
        sock = conn.sock
        second = post(conn, batch_body(track(1)))
        assert conn.sock is sock and sock is not None
    finally:
        conn.close()

    assert first[0] == second[0] == 200
    assert "close" not in first[1].get("Connection", "").lower()
    assert collector.connection_count() == 1
    assert collector.message_ids() == ["msg-0", "msg-1"]


def test_duplicates_are_recorded_each_time(collector: Collector) -> None:
    post(collector, batch_body(track(7)))
    post(collector, batch_body(track(7)))
    assert collector.message_ids() == ["msg-7", "msg-7"]


def test_chunked_request_body_is_accepted(collector: Collector) -> None:
    body = batch_body(track(0))
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        conn.request(
            "POST", "/v1/batch", body=iter([body[:10], body[10:]]), headers=HEADERS, encode_chunked=True
        )
        response = conn.getresponse()
        assert response.status == 200, response.read()
    finally:
        conn.close()
    assert collector.message_ids() == ["msg-0"]


@pytest.mark.parametrize(
    "headers",
    [
        {"Content-Type": "application/json"},
        {"Content-Type": "application/json", "Authorization": "Bearer "},
        {"Content-Type": "application/json", "Authorization": f"Basic {KEY}"},
        {"Content-Type": "application/json", "Authorization": "Bearer wrong-key"},
    ],
    ids=["missing", "empty", "not-bearer", "wrong"],
)
def test_bad_write_key_is_401_and_never_echoed(headers: dict[str, str]) -> None:
    echo = io.StringIO()
    with Collector(write_key=KEY, echo=echo) as collector:
        status, _, body = post(collector, headers=headers)
        assert post(collector)[0] == 200  # the right key works

    assert status == 401
    assert json.loads(body)["status"] == "error"
    assert KEY.encode() not in body and b"wrong-key" not in body
    assert KEY not in echo.getvalue() and "wrong-key" not in echo.getvalue()
    assert "-> 401 bad write key" in echo.getvalue()
    assert len(collector.events()) == 1


def test_any_non_empty_key_is_accepted_without_write_key(collector: Collector) -> None:
    status, _, _ = post(collector, headers={**HEADERS, "Authorization": "Bearer anything"})
    assert status == 200


def test_unknown_path_is_404_and_other_methods_are_405(collector: Collector) -> None:
    assert post(collector, path="/v1/nothing")[0] == 404
    status, headers, body = post(collector, method="GET", body=b"")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert json.loads(body)["status"] == "error"
    assert collector.events() == []
    assert [r.status for r in collector.requests()] == [404, 405]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"nobatch": []}',
        b'{"batch": {}}',
        b'{"batch": []}',
        batch_body(*[track(i) for i in range(MAX_BATCH_EVENTS + 1)]),
        b'{"batch": [{"type": "track", "x": NaN}]}',
    ],
    ids=["not-json", "not-object", "no-batch", "batch-not-list", "empty", "101-events", "nan"],
)
def test_bad_request_bodies_are_400(collector: Collector, body: bytes) -> None:
    status, headers, answer = post(collector, body)
    assert status == 400
    assert headers["Content-Type"] == "application/json"
    payload = json.loads(answer)
    assert payload["status"] == "error" and payload["message"]
    assert collector.events() == []


def test_wrong_content_type_is_400(collector: Collector) -> None:
    status, _, body = post(collector, headers={**HEADERS, "Content-Type": "text/plain"})
    assert status == 400
    assert "Content-Type" in json.loads(body)["message"]


def test_exactly_100_events_are_accepted(collector: Collector) -> None:
    status, _, body = post(collector, batch_body(*[track(i) for i in range(MAX_BATCH_EVENTS)]))
    assert status == 200 and json.loads(body)["accepted"] == MAX_BATCH_EVENTS


def test_oversize_body_is_413_and_the_connection_stays_usable(collector: Collector) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
    try:
        status, _, body = post(conn, b" " * (MAX_REQUEST_BYTES + 1))
        assert status == 413
        assert json.loads(body)["status"] == "error"
        assert post(conn)[0] == 200
    finally:
        conn.close()
    assert collector.connection_count() == 1
    assert [r.status for r in collector.requests()] == [413, 200]


def test_invalid_events_fail_alone_in_a_partial_200(collector: Collector) -> None:
    good_identify = {
        "type": "identify",
        "messageId": "i",
        "timestamp": "t",
        "userId": "u",
        "traits": {"email": "a@b.c"},
    }
    good_group = {
        "type": "group",
        "messageId": "g",
        "timestamp": "t",
        "groupId": "org",
        "userId": "u",
        "traits": {},
    }
    events: list[Any] = [
        track(0),  # 0 ok
        "not an object",  # 1
        {k: v for k, v in track(2).items() if k != "messageId"},  # 2
        track(3, type="page"),  # 3
        {k: v for k, v in track(4).items() if k != "userId"},  # 4
        {**good_identify, "properties": {}},  # 5
        {"type": "group", "messageId": "x", "timestamp": "t"},  # 6
        track(7, properties=[1]),  # 7
        good_identify,  # 8 ok
        good_group,  # 9 ok
        track(10, event=""),  # 10
        track(11, traits={}),  # 11
        {k: v for k, v in track(12, groupId="org").items() if k != "userId"},  # 12 ok
        track(13, timestamp=5),  # 13
    ]
    status, _, body = post(collector, batch_body(*events))

    assert status == 200
    answer = json.loads(body)
    failed = [1, 2, 3, 4, 5, 6, 7, 10, 11, 13]
    assert answer["status"] == "ok"
    assert answer["accepted"] == 4 and answer["failed"] == len(failed)
    assert [e["index"] for e in answer["errors"]] == failed
    assert {e["code"] for e in answer["errors"]} == {"invalid_event"}
    assert all(e["message"] for e in answer["errors"])
    assert collector.events() == [events[0], events[8], events[9], events[12]]


def test_event_size_limit_is_exact(collector: Collector) -> None:
    def sized(i: int, size: int) -> dict[str, Any]:
        event = track(i, properties={"blob": ""})
        base = len(json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
        return track(i, properties={"blob": "x" * (size - base)})

    status, _, body = post(collector, batch_body(sized(0, MAX_EVENT_BYTES), sized(1, MAX_EVENT_BYTES + 1)))
    assert status == 200
    answer = json.loads(body)
    assert answer["accepted"] == 1
    assert [(e["index"], e["code"]) for e in answer["errors"]] == [(1, "event_too_large")]
    assert collector.message_ids() == ["msg-0"]


# ---------------------------------------------------------------------------------------
# Faults
# ---------------------------------------------------------------------------------------


def test_status_fault_with_retry_after(collector: Collector) -> None:
    collector.respond(Fault.retry(429, retry_after="3"), Fault.status_code(503))

    status, headers, body = post(collector)
    assert status == 429
    assert headers["Retry-After"] == "3"
    assert json.loads(body)["status"] == "error"
    status, headers, _ = post(collector)
    assert status == 503 and "Retry-After" not in headers
    assert collector.events() == []
    assert [(r.status, r.fault) for r in collector.requests()] == [(429, "429"), (503, "503")]


def test_partial_fault_fails_the_given_indices(collector: Collector) -> None:
    collector.respond(Fault.partial(0, 2, 9))
    status, _, body = post(collector, batch_body(track(0), track(1), track(2)))

    assert status == 200
    answer = json.loads(body)
    assert (answer["accepted"], answer["failed"]) == (1, 2)
    assert [e["index"] for e in answer["errors"]] == [0, 2]
    assert all(e["code"] and e["message"] for e in answer["errors"])
    assert collector.message_ids() == ["msg-1"]
    assert collector.requests()[0].fault == "partial"


def test_non_json_200_fault(collector: Collector) -> None:
    collector.respond(Fault.non_json_200())
    status, headers, body = post(collector)
    assert (status, body) == (200, b"OK")
    assert headers["Content-Type"].startswith("text/plain")
    assert collector.message_ids() == ["msg-0"]


def test_unexpected_200_fault(collector: Collector) -> None:
    collector.respond(Fault.unexpected_200())
    status, _, body = post(collector)
    assert status == 200
    answer = json.loads(body)
    assert "status" not in answer and "accepted" not in answer
    assert collector.message_ids() == ["msg-0"]


def test_accepting_faults_leave_errors_alone(collector: Collector) -> None:
    collector.respond(Fault.non_json_200())
    assert post(collector, headers={"Content-Type": "application/json"})[0] == 401
    assert collector.requests()[0].fault == "non_json_200"


@pytest.mark.parametrize("fault", [Fault.reset_before_read(), Fault.reset_after_read()], ids=lambda f: f.kind)
def test_reset_faults_reset_the_connection(collector: Collector, fault: Fault) -> None:
    collector.respond(fault)
    body = batch_body(track(0))
    with pytest.raises(ConnectionError):  # ConnectionResetError, RemoteDisconnected, EPIPE
        post(collector, body)

    [request] = collector.requests()
    assert (request.status, request.fault) == (None, fault.kind)
    assert request.body == (body if fault.kind == "reset_after_read" else b"")
    assert collector.events() == []
    assert post(collector)[0] == 200  # and then back to normal


def _post_in_thread(collector: Collector, outcome: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            outcome.append(post(collector, timeout=30))
        except Exception as exc:  # the outcome is what the test checks
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_blackhole_is_released_by_stop() -> None:
    collector = Collector().start()
    collector.set_mode(Fault.blackhole())
    outcome: list[Any] = []
    thread = _post_in_thread(collector, outcome)
    assert collector.wait_for_requests(1, timeout=5)
    assert outcome == []  # still hanging

    started = time.monotonic()
    collector.stop()
    thread.join(timeout=5)
    assert time.monotonic() - started < 2
    assert not thread.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionError)
    assert collector.requests()[0].status is None and collector.events() == []
    collector.stop()  # idempotent


def test_blackhole_is_released_by_set_mode_none(collector: Collector) -> None:
    collector.set_mode(Fault.blackhole())
    outcome: list[Any] = []
    thread = _post_in_thread(collector, outcome)
    assert collector.wait_for_requests(1, timeout=5)

    collector.set_mode(None)
    thread.join(timeout=5)
    assert not thread.is_alive() and isinstance(outcome[0], ConnectionError)
    assert post(collector)[0] == 200


def test_slow_fault_answers_late_but_records_at_once(collector: Collector) -> None:
    collector.respond(Fault.slow(0.3), Fault.slow(0.3))
    started = time.monotonic()
    assert post(collector)[0] == 200
    assert time.monotonic() - started >= 0.3

    with pytest.raises(socket.timeout):  # the ambiguous case: timed out, yet accepted
        post(collector, batch_body(track(1)), timeout=0.05)
    assert collector.message_ids() == ["msg-0", "msg-1"]


def test_drip_fault_writes_the_response_slowly(collector: Collector) -> None:
    collector.respond(Fault.drip(0.02))
    started = time.monotonic()
    status, _, body = post(collector)
    elapsed = time.monotonic() - started

    assert status == 200 and json.loads(body)["accepted"] == 1
    assert elapsed >= 5 * 0.02  # a response of 100+ bytes is at least 7 pieces
    assert collector.requests()[0].fault == "drip"


def test_scripted_faults_go_in_order_then_normal(collector: Collector) -> None:
    collector.respond(Fault.status_code(500), Fault.status_code(502), Fault.partial(0))
    statuses = [post(collector)[0] for _ in range(4)]
    assert statuses == [500, 502, 200, 200]
    assert [r.fault for r in collector.requests()] == ["500", "502", "partial", None]
    assert len(collector.events()) == 1


def test_scripted_faults_come_before_the_standing_mode(collector: Collector) -> None:
    collector.set_mode(Fault.status_code(503, retry_after="1"))
    collector.respond(Fault.non_json_200())
    assert [post(collector)[0] for _ in range(3)] == [200, 503, 503]
    collector.set_mode(None)
    assert post(collector)[0] == 200


def _fault_sequence(seed: int, n: int) -> list[str | None]:
    with Collector() as collector:
        collector.set_random_faults(seed, {"500": 0.3, "429": 0.2, "reset_before_read": 0.1})
        for i in range(n):
            try:
                post(collector, batch_body(track(i)))
            except ConnectionError:
                pass
        assert collector.random_seed == seed
        return [r.fault for r in collector.requests()]


def test_random_faults_are_deterministic_per_seed() -> None:
    first = _fault_sequence(1234, 40)
    assert first == _fault_sequence(1234, 40)
    assert {"500", "429", "reset_before_read", None} == set(first)
    assert first != _fault_sequence(99, 40)


def test_reset_forgets_everything(collector: Collector) -> None:
    post(collector)
    collector.respond(Fault.status_code(500))
    collector.set_mode(Fault.status_code(503))
    collector.set_random_faults(1, {"500": 1.0})
    collector.reset()

    assert collector.events() == [] and collector.requests() == []
    assert collector.random_seed is None
    assert post(collector)[0] == 200


def test_fault_specs_and_json_round_trip() -> None:
    assert Fault.parse("500") == Fault.status_code(500)
    assert Fault.parse("slow:0.5") == Fault.slow(0.5)
    assert Fault.parse("partial:0,3") == Fault.partial(0, 3)
    assert Fault.parse("reset_before_read").name == "reset_before_read"
    for fault in (Fault.retry(429, retry_after=2), Fault.partial(1), Fault.non_json_200(b"x")):
        assert Fault.from_dict(fault.to_dict()) == fault
    with pytest.raises(ValueError):
        Fault("nope")
    with pytest.raises(ValueError):
        Fault("status")
    with pytest.raises(ValueError):
        Fault.retry(429, retry_after="1\r\nX-Evil: 1")
    with pytest.raises(ValueError):
        Collector().set_random_faults(1, {"500": 0.7, "503": 0.7})


# ---------------------------------------------------------------------------------------
# Waiting, connections, control endpoints, echo
# ---------------------------------------------------------------------------------------


def test_wait_for_events_times_out_with_false(collector: Collector) -> None:
    started = time.monotonic()
    assert collector.wait_for_events(1, timeout=0.1) is False
    assert 0.09 <= time.monotonic() - started < 2
    assert collector.wait_for_requests(1, timeout=0.01) is False


def test_wait_for_events_wakes_when_events_arrive(collector: Collector) -> None:
    outcome: list[Any] = []
    thread = _post_in_thread(collector, outcome)
    assert collector.wait_for_events(1, timeout=5)
    thread.join(timeout=5)
    assert outcome[0][0] == 200


def test_stop_closes_idle_keep_alive_connections() -> None:
    collector = Collector().start()
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        assert post(conn)[0] == 200
        collector.stop()
        with pytest.raises(ConnectionError):
            post(conn)
    finally:
        conn.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", collector.port), timeout=1).close()


def test_close_idle_connections_makes_them_stale(collector: Collector) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        assert post(conn)[0] == 200
        assert collector.close_idle_connections() == 1
        with pytest.raises(ConnectionError):
            post(conn)
        conn.close()
        assert post(conn)[0] == 200  # http.client reconnects
    finally:
        conn.close()
    assert collector.connection_count() == 2


def _control(
    collector: Collector, method: str, path: str, payload: Any = None, *, key: str | None = None
) -> Any:
    body = b"" if payload is None and method == "GET" else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    status, _, answer = post(collector, body, method=method, path=path, headers=headers)
    assert status == 200, answer
    return json.loads(answer)


def test_control_endpoints(collector: Collector) -> None:
    post(collector)
    assert _control(collector, "GET", "/_klime/events") == [track(0)]
    [summary] = _control(collector, "GET", "/_klime/requests")
    assert (summary["method"], summary["path"], summary["status"]) == ("POST", "/v1/batch", 200)
    assert KEY not in json.dumps(summary)

    _control(collector, "POST", "/_klime/mode", {"kind": "status", "status": 503, "retry_after": "2"})
    status, headers, _ = post(collector)
    assert (status, headers["Retry-After"]) == (503, "2")
    _control(collector, "POST", "/_klime/mode", None)
    assert post(collector)[0] == 200

    _control(collector, "POST", "/_klime/respond", [{"kind": "status", "status": 500}, "502"])
    assert [post(collector)[0] for _ in range(3)] == [500, 502, 200]

    _control(collector, "POST", "/_klime/reset", {})
    assert _control(collector, "GET", "/_klime/events") == []
    assert collector.requests() == []  # control calls are not recorded

    status, _, _ = post(
        collector, b'{"kind": "nope"}', path="/_klime/mode", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    threading.Thread(target=post, args=(collector,), daemon=True).start()
    assert _control(collector, "GET", "/_klime/events?min=1&timeout=5") == [track(0)]


def _status_of(collector: Collector, path: str, headers: dict[str, str], method: str = "GET") -> int:
    """The status of one control request sent with exactly ``headers`` (Host included)."""
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.putheader("Content-Length", "0")
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_control_endpoints_need_the_write_key_when_the_server_has_one() -> None:
    with Collector(write_key=KEY) as collector:
        host = {"Host": f"127.0.0.1:{collector.port}"}
        post(collector)
        assert _status_of(collector, "/_klime/events", host) == 401
        assert _status_of(collector, "/_klime/events", {**host, "Authorization": "Bearer nope"}) == 401
        assert _status_of(collector, "/_klime/events", {**host, "Authorization": KEY}) == 401  # no scheme
        assert _status_of(collector, "/_klime/reset", host, method="POST") == 401
        assert _status_of(collector, "/_klime/health", host) == 401
        assert len(collector.events()) == 1  # the refused reset did nothing
        assert _control(collector, "GET", "/_klime/events", key=KEY) == [track(0)]
        _control(collector, "POST", "/_klime/reset", {}, key=KEY)
        assert collector.events() == []
        # the key can change while running (the attribute is read at each request)
        collector.write_key = "rotated"
        assert _status_of(collector, "/_klime/health", {**host, "Authorization": f"Bearer {KEY}"}) == 401
        assert _control(collector, "GET", "/_klime/health", key="rotated") == {"status": "ok"}


def test_control_endpoints_refuse_foreign_hosts_and_origins() -> None:
    """DNS rebinding (a foreign name in Host) and cross-origin browser requests (Origin,
    Sec-Fetch-Site) are refused, with or without a write key; the batch endpoint is not
    affected (an SDK may reach the collector by any name)."""
    for write_key in (None, KEY):
        with Collector(write_key=write_key) as collector:
            port = collector.port
            auth = {"Authorization": f"Bearer {KEY}"}
            ok = {"Host": f"127.0.0.1:{port}", **auth}
            for good_host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"LOCALHOST:{port}"):
                assert _status_of(collector, "/_klime/health", {**auth, "Host": good_host}) == 200, good_host
            for bad_host in (
                f"evil.example:{port}",
                "evil.example",
                f"127.0.0.1:{port + 1}",
                "127.0.0.1",
                f"localhost.evil.example:{port}",
                f"127.0.0.2:{port}",
                f"127.0.0.1:{port}x",
                "",
            ):
                assert _status_of(collector, "/_klime/health", {**auth, "Host": bad_host}) == 403, bad_host
            assert _status_of(collector, "/_klime/health", auth) == 403  # no Host at all
            for bad_origin in (
                "http://evil.example",
                f"http://evil.example:{port}",
                "null",
                f"https://127.0.0.1:{port}",
            ):
                headers = {**ok, "Origin": bad_origin}
                assert _status_of(collector, "/_klime/reset", headers, "POST") == 403, bad_origin
            assert (
                _status_of(collector, "/_klime/health", {**ok, "Origin": f"http://127.0.0.1:{port}"}) == 200
            )
            assert (
                _status_of(collector, "/_klime/health", {**ok, "Origin": f"http://localhost:{port}"}) == 200
            )
            assert _status_of(collector, "/_klime/health", {**ok, "Sec-Fetch-Site": "cross-site"}) == 403
            assert _status_of(collector, "/_klime/health", {**ok, "Sec-Fetch-Site": "same-origin"}) == 200
            assert (
                _status_of(collector, "/_klime/reset", {**ok, "Sec-Fetch-Site": "same-site"}, "POST") == 403
            )
            rebound = {**HEADERS, "Host": f"evil.example:{port}"}
            assert post(collector, headers=rebound)[0] == 200
            assert len(collector.events()) == 1


def test_control_access_rules_for_a_server_on_all_interfaces() -> None:
    """Bound to every interface (checked without binding one): any IP address in Host is
    taken (an address cannot be rebound), a name other than localhost is not."""
    from klime.devserver._answers import Refusal
    from klime.devserver._control import check_access

    def verdict(host: str) -> int:
        headers = {"Host": host, "Authorization": f"Bearer {KEY}"}
        try:
            check_access(headers.get, bound_host="0.0.0.0", port=8787, write_key=KEY)
        except Refusal as refusal:
            return refusal.status
        return 200

    assert [verdict(h) for h in ("192.0.2.7:8787", "[2001:db8::1]:8787", "localhost:8787")] == [200] * 3
    assert [verdict(h) for h in ("evil.example:8787", "192.0.2.7:9999", "192.0.2.7")] == [403] * 3


def test_echo_prints_one_line_per_event_and_per_rejection() -> None:
    echo = io.StringIO()
    identify = {
        "type": "identify",
        "messageId": "i",
        "timestamp": "t",
        "userId": "user_123",
        "traits": {"email": "a@b.c"},
    }
    group = {
        "type": "group",
        "messageId": "g",
        "timestamp": "t",
        "groupId": "org_456",
        "userId": "user_123",
        "traits": {"name": "Acme"},
    }
    with Collector(echo=echo) as collector:
        post(collector, batch_body(track(0), identify, group))
        collector.respond(Fault.status_code(500))
        post(collector)

    lines = echo.getvalue().splitlines()
    # an event of another time than now (history) shows its own
    assert lines[0][12:] == (
        '  track     "Button Clicked"  user=user_123  {"plan": "pro"}  at=2024-05-01T07:21:03.120Z'
    )
    assert lines[1].endswith('  identify  user=user_123  {"email": "a@b.c"}')
    assert lines[2].endswith('  group     org_456  user=user_123  {"name": "Acme"}')
    assert lines[3].endswith("-> 500 (fault)")
    assert len(lines) == 4


def _raw_request(port: int, data: bytes) -> bytes:
    """Send ``data`` as it is (http.client refuses control characters in a path)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


def test_echo_escapes_terminal_control_characters() -> None:
    """OSC (retitle), CSI (clear screen) as ESC sequences and as C1 code points, BEL, DEL
    and newlines in event text or a request path are printed as \\xNN; other Unicode is
    printed as it is."""
    echo = io.StringIO()
    hostile = track(
        0,
        event="Signup \x1b]0;pwned\x07",
        userId="u\x1b[2J\x1b[H",
        groupId="org\nforged line",
        properties={"csi": "\x9b31mred", "del": "a\x7fb", "plan": "pro é 中"},
    )
    group = {"type": "group", "messageId": "g", "timestamp": "t", "groupId": "\x1bP\x1b\\", "traits": {}}
    with Collector(echo=echo) as collector:
        assert post(collector, batch_body(hostile, group))[0] == 200
        answer = _raw_request(collector.port, b"GET /x\x1b[2J HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 404")
    out = echo.getvalue()
    controls = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n"}
    assert not controls & set(out), repr(out)
    lines = out.splitlines()
    assert len(lines) == 3, lines  # the newline in groupId forged no line
    assert "user=u\\x1b[2J\\x1b[H" in lines[0] and "group=org\\x0aforged line" in lines[0]
    assert "\\x9b31mred" in lines[0] and "a\\x7fb" in lines[0] and "pro é 中" in lines[0]
    assert "\\x1b]0;pwned\\x07" in lines[0] or "\\u001b]0;pwned\\u0007" in lines[0]
    assert "group     \\x1bP\\x1b\\" in lines[1]
    assert lines[2].endswith("-> 404 GET /x\\x1b[2J")


def test_many_requests_per_second_on_one_connection(collector: Collector) -> None:
    body = batch_body(*[track(i) for i in range(20)])
    conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=5)
    n = 300
    started = time.monotonic()
    try:
        for _ in range(n):
            conn.request("POST", "/v1/batch", body=body, headers=HEADERS)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
    finally:
        conn.close()
    rate = n / (time.monotonic() - started)
    assert rate > 300, f"only {rate:.0f} requests/s"
    assert len(collector.events()) == 20 * n


# ---------------------------------------------------------------------------------------
# Timing and concurrency: started_at / answered_at, in_flight / peak_in_flight
# ---------------------------------------------------------------------------------------


def _post_from_threads(collector: Collector, n: int, outcome: list[Any]) -> list[threading.Thread]:
    """``n`` threads, each posting one batch on its own connection; outcomes appended."""
    lock = threading.Lock()

    def run(i: int) -> None:
        try:
            result: Any = post(collector, batch_body(track(i)), timeout=60)
        except Exception as exc:  # the outcome is what the test checks
            result = exc
        with lock:
            outcome.append(result)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    return threads


def _overlap_bounds(requests: list[RecordedRequest]) -> tuple[int, int]:
    """The most requests open at once by their [started_at, answered_at] times: ties read
    as ends first (the lower bound) and as starts first (the upper bound)."""
    bounds = []
    for ends_first in (True, False):
        points = []
        for r in requests:
            assert r.started_at is not None and r.answered_at is not None
            points.append((r.started_at, 0 if ends_first else 1, +1))
            points.append((r.answered_at, 1 if ends_first else 0, -1))
        level = most = 0
        for _, _, step in sorted(points):
            level += step
            most = max(most, level)
        bounds.append(most)
    return bounds[0], bounds[1]


def test_a_request_records_when_it_started_and_was_answered(collector: Collector) -> None:
    before = time.monotonic()
    assert post(collector)[0] == 200
    after = time.monotonic()
    collector.respond(Fault.slow(0.2))
    assert post(collector, batch_body(track(1)))[0] == 200

    quick, slow = collector.requests()
    times = [(r.started_at, r.received_at, r.answered_at) for r in (quick, slow)]
    assert all(None not in t for t in times), times
    (q_start, q_received, q_answered), (s_start, s_received, s_answered) = times
    assert before <= q_start <= q_received <= q_answered <= after
    assert s_start <= s_received and s_answered - s_received >= 0.2
    first = _control(collector, "GET", "/_klime/requests")[0]
    assert (first["started_at"], first["answered_at"]) == (q_start, q_answered)


@pytest.mark.parametrize(
    "fault", [Fault.slow(30), Fault.status_code(503, delay=30), Fault.blackhole()], ids=lambda f: f.kind
)
def test_requests_held_by_a_fault_count_in_flight(fault: Fault) -> None:
    n = 5
    collector = Collector().start()
    outcome: list[Any] = []
    try:
        collector.set_mode(fault)
        threads = _post_from_threads(collector, n, outcome)
        assert collector.wait_for_in_flight(n, timeout=10), collector.in_flight
        assert collector.wait_for_requests(n, timeout=10)
        assert (collector.in_flight, collector.peak_in_flight) == (n, n)
        assert outcome == []  # every answer is still held
        held = collector.requests()
        assert all(r.started_at is not None and r.answered_at is None for r in held)
        assert collector.wait_for_in_flight(n + 1, timeout=0.05) is False
    finally:
        collector.stop()  # resets the held connections
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert len(outcome) == n and all(isinstance(o, ConnectionError) for o in outcome)
    assert (collector.in_flight, collector.peak_in_flight) == (0, n)
    assert all(r.answered_at is not None for r in collector.requests())


def test_a_delayed_answer_counts_until_it_is_handed_over(collector: Collector) -> None:
    collector.respond(Fault.status_code(503, delay=0.3))
    outcome: list[Any] = []
    [thread] = _post_from_threads(collector, 1, outcome)
    assert collector.wait_for_in_flight(1, timeout=10)
    assert collector.wait_for_requests(1, timeout=10)
    assert collector.requests()[0].answered_at is None  # recorded at once, answered later
    thread.join(timeout=10)

    assert outcome[0][0] == 503
    # The count drops before the answer's last byte is written: no wait needed here.
    assert (collector.in_flight, collector.peak_in_flight) == (0, 1)
    [request] = collector.requests()
    assert request.answered_at is not None and request.started_at is not None
    assert request.answered_at - request.received_at >= 0.3


def test_peak_in_flight_agrees_with_the_recorded_times(collector: Collector) -> None:
    threads_n, per_thread = 8, 15
    collector.set_mode(Fault.slow(0.005))
    errors: list[BaseException] = []

    def run() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=30)
        try:
            for i in range(per_thread):
                assert post(conn, batch_body(track(i)))[0] == 200
                post(conn, b"", method="GET")  # a 405 on /v1/batch: not a batch request
        except BaseException as exc:
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=run, daemon=True) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive()
    assert errors == []

    batches = [r for r in collector.requests() if r.method == "POST"]
    assert len(batches) == threads_n * per_thread
    low, high = _overlap_bounds(batches)
    assert collector.in_flight == 0
    assert 1 <= low <= collector.peak_in_flight <= high <= threads_n

    collector.reset()
    assert (collector.in_flight, collector.peak_in_flight) == (0, 0)


def test_reset_keeps_the_requests_still_in_flight_in_the_peak() -> None:
    collector = Collector().start()
    outcome: list[Any] = []
    try:
        assert post(collector)[0] == 200
        collector.respond(Fault.slow(30), Fault.slow(30))
        threads = _post_from_threads(collector, 2, outcome)
        assert collector.wait_for_in_flight(2, timeout=10)
        assert collector.wait_for_requests(3, timeout=10)  # both held requests recorded, too
        collector.reset()  # forgets the record, not the requests being handled
        assert (collector.in_flight, collector.peak_in_flight) == (2, 2)
        assert collector.requests() == []
    finally:
        collector.stop()
    for thread in threads:
        thread.join(timeout=10)
    assert collector.in_flight == 0
    assert collector.requests() == []  # answers of before the reset do not come back


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def test_cli_runs_a_command_against_the_collector_and_summarises() -> None:
    script = (
        "import json, os, sys, urllib.error, urllib.request\n"
        "event = {'type': 'track', 'messageId': 'm1', 'timestamp': '2024-01-01T00:00:00.000Z',"
        " 'event': 'Button Clicked', 'userId': 'user_123', 'properties': {'plan': 'pro'}}\n"
        "request = urllib.request.Request(os.environ['KLIME_ENDPOINT'] + '/v1/batch',"
        " data=json.dumps({'batch': [event]}).encode(), method='POST', headers={"
        "'Content-Type': 'application/json',"
        " 'Authorization': 'Bearer ' + os.environ['KLIME_WRITE_KEY']})\n"
        "print('child got', urllib.request.urlopen(request, timeout=5).status, flush=True)\n"
        "control = os.environ['KLIME_ENDPOINT'] + '/_klime/events'\n"
        "try:\n"
        "    urllib.request.urlopen(control, timeout=5)\n"
        "except urllib.error.HTTPError as error:\n"
        "    print('control without the key', error.code, flush=True)\n"
        "keyed = urllib.request.Request(control, headers={"
        "'Authorization': 'Bearer ' + os.environ['KLIME_WRITE_KEY']})\n"
        "answer = json.load(urllib.request.urlopen(keyed, timeout=5))\n"
        "print('control with the key', len(answer), flush=True)\n"
        "sys.exit(3)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "klime.devserver",
            "--port",
            "0",
            "--write-key",
            "k1",
            "--",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=subprocess_env(),
    )
    out = result.stdout
    assert result.returncode == 3, (out, result.stderr)
    assert out.startswith("klime devserver listening on http://127.0.0.1:")
    assert "child got 200" in out
    assert "control without the key 401" in out and "control with the key 1" in out
    assert '  track     "Button Clicked"  user=user_123  {"plan": "pro"}' in out
    assert "1 events arrived: 1 track, 0 identify, 0 group" in out


def test_cli_serves_with_a_standing_failure_until_interrupted() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "klime.devserver", "--port", "0", "--fail", "503", "--retry-after", "7"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 15)
        assert ready, "no listening line"
        line = process.stdout.readline()
        assert line.startswith("klime devserver listening on http://127.0.0.1:")
        port = int(line.strip().rsplit(":", 1)[1])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            status, headers, _ = post(conn)
        finally:
            conn.close()
        assert (status, headers["Retry-After"]) == (503, "7")
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "-> 503 (fault)" in out


def test_an_event_of_now_shows_no_time_of_its_own() -> None:
    from klime._events import now_timestamp
    from klime.devserver._printer import describe_event

    assert "at=" not in describe_event(track(0, timestamp=now_timestamp()))
    assert describe_event(track(0)).endswith("  at=2024-05-01T07:21:03.120Z")
