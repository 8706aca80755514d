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

HTTP/1.1 keep-alive, Nagle off, each response written with one ``send``: a loopback request
costs the collector a few tens of microseconds, far below what an SDK spends making it.
Thread-safe; the server runs on daemon threads of the process that creates it.
"""

from __future__ import annotations

import gzip
import json
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Set

__all__ = ["CountingCollector"]

_RESPONSE_HEAD = (
    "HTTP/1.1 {status} {reason}\r\n"
    "Content-Type: application/json\r\n"
    "Content-Length: {length}\r\n"
    "{extra}"
    "\r\n"
)


class _RunStats:
    __slots__ = (
        "bad",
        "bytes",
        "duplicates",
        "events",
        "first_ns",
        "ids",
        "last_ns",
        "missing_ids",
        "other",
        "paths",
        "requests",
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

    def log_message(self, format: str, *args: Any) -> None:  # silence per-request logging
        pass

    def _reply(self, status: int, reason: str, body: bytes) -> None:
        extra = "Connection: close\r\n" if self.close_connection else ""
        head = _RESPONSE_HEAD.format(status=status, reason=reason, length=len(body), extra=extra)
        self.wfile.write(head.encode("ascii") + body)

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

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        run, _, rest = path.lstrip("/").partition("/")
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
        ids = [e.get("messageId") or e.get("uuid") if isinstance(e, dict) else None for e in batch]
        self.server.count_batch(run, rest, ids, len(raw), arrived)
        body = b'{"status":"ok","accepted":%d,"failed":0,"errors":[]}' % len(batch)
        self._reply(200, "OK", body)

    def do_GET(self) -> None:
        run, _, rest = self.path.lstrip("/").partition("/")
        self.server.count_other(run, "GET /" + rest.split("?", 1)[0])
        self._reply(404, "Not Found", b'{"status":"error","message":"unknown path"}')


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: Any) -> None:
        super().__init__(address, _Handler)
        self.lock = threading.Lock()
        self.runs: Dict[str, _RunStats] = {}

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
    on I/O.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._server = _Server((host, port))
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

    def forget(self, run: str) -> None:
        """Free the id set of a finished run."""
        with self._server.lock:
            self._server.runs.pop(run, None)

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
