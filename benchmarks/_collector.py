"""A small, fast counting collector for the benchmark.

It accepts the batch endpoints of all three SDKs under a per-run path prefix, so runs never
mix and no reset is needed between them:

    POST /<run>/v1/batch    klime and Segment   events carry "messageId"
    POST /<run>/batch/      PostHog (capture v0) events carry "uuid"

and answers 200 with a Klime-style body (``{"status":"ok","accepted":N,...}``); Segment and
PostHog only look at the status. Bodies may be gzip-compressed (``Content-Encoding: gzip``)
or chunked. For each run it counts requests, bytes, events and distinct event ids, and keeps
the ``time.monotonic_ns()`` of the first and last batch received (CLOCK_MONOTONIC is one
clock for every process on Linux, so a worker's timestamps can be compared with these).

Round trips (``roundtrip.py``): a run can be given a delay and a status
(:meth:`CountingCollector.configure`). Each request is then answered ``delay`` after its
request line arrived, from the thread of its own keep-alive connection, so requests on
different connections are delayed independently, as they would be by a network; a status
other than 2xx rejects the batch (its ids are not counted as delivered). Per run the
collector also counts the requests in flight (arrived, not answered yet: the peak is kept),
the connections that carried the run's requests and, per request, the arrival and answer
times and the status (:meth:`CountingCollector.spans`).

HTTP/1.1 keep-alive, Nagle off, each response written with one ``send``: a loopback request
costs the collector a few tens of microseconds, far below what an SDK spends making it.
Thread-safe; the server runs on daemon threads of the process that creates it.
"""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
import zlib
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Set, Tuple

__all__ = ["CountingCollector"]

_RESPONSE_HEAD = (
    "HTTP/1.1 {status} {reason}\r\n"
    "Content-Type: application/json\r\n"
    "Content-Length: {length}\r\n"
    "{extra}"
    "\r\n"
)


#: (arrived_ns, answered_ns, status) of one request.
Span = Tuple[int, int, int]


class _RunStats:
    __slots__ = (
        "bad",
        "bytes",
        "connections",
        "duplicates",
        "events",
        "first_ns",
        "ids",
        "in_flight",
        "last_ns",
        "missing_ids",
        "other",
        "paths",
        "peak_in_flight",
        "rejected",
        "rejected_events",
        "requests",
        "spans",
    )

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.events = 0
        self.duplicates = 0
        self.missing_ids = 0
        self.bad = 0
        self.other = 0
        self.ids: Set[str] = set()
        self.paths: Dict[str, int] = {}
        self.first_ns: Optional[int] = None
        self.last_ns: Optional[int] = None
        self.rejected = 0  # batch requests answered with a non-2xx status (ids not counted)
        self.rejected_events = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.connections = 0
        self.spans: List[Span] = []

    def snapshot(self) -> Dict[str, Any]:
        return {
            "requests": self.requests,
            "bytes": self.bytes,
            "events": self.events,
            "unique": len(self.ids),
            "duplicates": self.duplicates,
            "missing_ids": self.missing_ids,
            "bad_requests": self.bad,
            "other_requests": self.other,
            "paths": dict(self.paths),
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
            "rejected": self.rejected,
            "rejected_events": self.rejected_events,
            "peak_in_flight": self.peak_in_flight,
            "connections": self.connections,
        }


def _read_chunked(rfile: Any) -> bytes:
    parts: List[bytes] = []
    while True:
        line = rfile.readline(65537)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        parts.append(rfile.read(size))
        rfile.readline(65537)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        self._runs_seen: Set[str] = set()  # runs this connection has carried
        self._arrived_ns = 0
        self._answer_at_ns = 0
        self._sent = 0  # the status of the answer written for the current request (0: none yet)

    def log_message(self, format: str, *args: Any) -> None:  # silence per-request logging
        pass

    def parse_request(self) -> bool:
        # called as soon as the request line has been read: the request's arrival
        self._arrived_ns = time.monotonic_ns()
        return super().parse_request()

    def _reply(self, status: int, reason: str, body: bytes) -> None:
        extra = "Connection: close\r\n" if self.close_connection else ""
        head = _RESPONSE_HEAD.format(status=status, reason=reason, length=len(body), extra=extra)
        wait_ns = self._answer_at_ns - time.monotonic_ns()
        if wait_ns > 0:  # the round trip: answer `delay` after the request arrived
            time.sleep(wait_ns / 1e9)
        self.wfile.write(head.encode("ascii") + body)
        self._sent = status

    def _body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            raw = _read_chunked(self.rfile)
        else:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            raw = gzip.decompress(raw)
        elif encoding == "deflate":
            raw = zlib.decompress(raw)
        return raw

    def _begin(self, run: str) -> int:
        """Count the request in flight; the status its batch is to be answered with."""
        first_on_connection = run not in self._runs_seen
        if first_on_connection:
            self._runs_seen.add(run)
        delay_ns, status = self.server.begin(run, first_on_connection)
        self._answer_at_ns = self._arrived_ns + delay_ns
        self._sent = 0
        return status

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        run, _, rest = path.lstrip("/").partition("/")
        status = self._begin(run)
        try:
            try:
                raw = self._body()
            except Exception:
                self.close_connection = True
                self._reply(400, "Bad Request", b'{"status":"error","message":"unreadable body"}')
                return
            arrived = time.monotonic_ns()
            if rest not in ("v1/batch", "batch/", "batch"):
                self.server.count_other(run, "POST /" + rest)
                self._reply(404, "Not Found", b'{"status":"error","message":"unknown path"}')
                return
            try:
                payload = json.loads(raw)
                batch = payload["batch"]
                if not isinstance(batch, list):
                    raise TypeError("batch is not a list")
            except Exception:
                self.server.count_bad(run, len(raw))
                self._reply(400, "Bad Request", b'{"status":"error","message":"bad batch"}')
                return
            if 200 <= status < 300:
                ids = [e.get("messageId") or e.get("uuid") if isinstance(e, dict) else None for e in batch]
                self.server.count_batch(run, rest, ids, len(raw), arrived)
                body = b'{"status":"ok","accepted":%d,"failed":0,"errors":[]}' % len(batch)
                self._reply(status, "OK", body)
            else:
                self.server.count_rejected(run, rest, len(batch), len(raw))
                self._reply(status, _reason(status), b'{"status":"error","message":"rejected"}')
        finally:
            self.server.end(run, self._arrived_ns, time.monotonic_ns(), self._sent)

    def do_GET(self) -> None:
        run, _, rest = self.path.lstrip("/").partition("/")
        self._begin(run)
        try:
            self.server.count_other(run, "GET /" + rest.split("?", 1)[0])
            self._reply(404, "Not Found", b'{"status":"error","message":"unknown path"}')
        finally:
            self.server.end(run, self._arrived_ns, time.monotonic_ns(), self._sent)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, address: Any, delay_ns: int = 0, status: int = 200) -> None:
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.runs: Dict[str, _RunStats] = {}
        self.default_behaviour = (delay_ns, status)
        self.behaviours: Dict[str, Tuple[int, int]] = {}

    def begin(self, run: str, new_connection: bool) -> Tuple[int, int]:
        with self.lock:
            stats = self._run(run)
            stats.in_flight += 1
            if stats.in_flight > stats.peak_in_flight:
                stats.peak_in_flight = stats.in_flight
            if new_connection:
                stats.connections += 1
            return self.behaviours.get(run, self.default_behaviour)

    def end(self, run: str, arrived_ns: int, answered_ns: int, status: int) -> None:
        with self.lock:
            stats = self.runs.get(run)
            if stats is None:  # forgotten while this request was being answered
                return
            stats.in_flight -= 1
            stats.spans.append((arrived_ns, answered_ns, status))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that leaves mid-request (an SDK giving up at exit, a killed worker) is
        # part of what is measured, not an error of the collector: no traceback on stderr.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def count_rejected(self, run: str, path: str, events: int, size: int) -> None:
        with self.lock:
            stats = self._run(run)
            stats.requests += 1
            stats.bytes += size
            stats.rejected += 1
            stats.rejected_events += events
            stats.paths[path] = stats.paths.get(path, 0) + 1

    def _run(self, run: str) -> _RunStats:
        stats = self.runs.get(run)
        if stats is None:
            stats = self.runs[run] = _RunStats()
        return stats

    def count_batch(self, run: str, path: str, ids: List[Any], size: int, arrived: int) -> None:
        with self.lock:
            stats = self._run(run)
            stats.requests += 1
            stats.bytes += size
            stats.events += len(ids)
            stats.paths[path] = stats.paths.get(path, 0) + 1
            seen = stats.ids
            for event_id in ids:
                if not isinstance(event_id, str):
                    stats.missing_ids += 1
                elif event_id in seen:
                    stats.duplicates += 1
                else:
                    seen.add(event_id)
            if stats.first_ns is None:
                stats.first_ns = arrived
            if stats.last_ns is None or arrived > stats.last_ns:
                stats.last_ns = arrived

    def count_bad(self, run: str, size: int) -> None:
        with self.lock:
            stats = self._run(run)
            stats.requests += 1
            stats.bytes += size
            stats.bad += 1

    def count_other(self, run: str, what: str) -> None:
        with self.lock:
            stats = self._run(run)
            stats.other += 1
            stats.paths[what] = stats.paths.get(what, 0) + 1


class CountingCollector:
    """The collector, serving on 127.0.0.1 from a daemon thread while open.

    ``with CountingCollector() as c: url = c.url("run1")`` — then point an SDK's host or
    endpoint at ``url`` and read ``c.stats("run1")``. Thread-safe; ``stats`` never blocks
    on I/O. ``delay`` (seconds) and ``status`` are the default behaviour of every run;
    :meth:`configure` sets them for one run.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0, status: int = 200) -> None:
        self._server = _Server((host, port), int(delay * 1e9), int(status))
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, run: str) -> str:
        """The base URL for one run (each SDK appends its own batch path)."""
        return f"http://127.0.0.1:{self.port}/{run}"

    def stats(self, run: str) -> Dict[str, Any]:
        """A snapshot of what arrived for ``run`` (zeros if nothing did)."""
        with self._server.lock:
            stats = self._server.runs.get(run) or _RunStats()
            return stats.snapshot()

    def configure(self, run: str, delay: float = 0.0, status: int = 200) -> None:
        """Answer the requests of ``run`` ``delay`` seconds after each arrived, with ``status``
        (a 2xx status accepts the batch; any other rejects it)."""
        with self._server.lock:
            self._server.behaviours[run] = (int(delay * 1e9), int(status))

    def spans(self, run: str) -> List[Span]:
        """``(arrived_ns, answered_ns, status)`` of every answered request of ``run``, in the
        order they were answered (status 0: the connection broke before an answer)."""
        with self._server.lock:
            stats = self._server.runs.get(run)
            return list(stats.spans) if stats else []

    def forget(self, run: str) -> None:
        """Free the id set (and the settings) of a finished run."""
        with self._server.lock:
            self._server.runs.pop(run, None)
            self._server.behaviours.pop(run, None)

    def start(self) -> CountingCollector:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="bench-collector",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> CountingCollector:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
