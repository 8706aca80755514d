"""A raw HTTP server on 127.0.0.1 that misbehaves on purpose, byte by byte.

Each connection's requests are read whole (request line, headers, ``Content-Length`` body)
and recorded; each is then answered by a script: exact bytes, sent at once or one byte at a
time with a pause between bytes (a server that trickles its status line, headers or body),
or an endless body. A script stops as soon as the client hangs up or the server is closed,
so nothing outlives a test. Also serves as a proxy stand-in: a ``CONNECT`` request is
recorded like any other.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple


@dataclass
class Received:
    """One request as the server read it."""

    line: str
    headers: Dict[str, str] = field(default_factory=dict)
    body: bytes = b""


#: A script: writes an answer to the connection; ``stop`` is set when the server closes.
Script = Callable[[socket.socket, Received, threading.Event], None]


def answer(raw: bytes, *, every: float = 0.0, head: Optional[bytes] = None) -> Script:
    """Send ``head`` at once (if given), then ``raw``: at once, or one byte every ``every``
    seconds. Stops when the client hangs up or the server closes."""

    def script(conn: socket.socket, request: Received, stop: threading.Event) -> None:
        if head:
            conn.sendall(head)
        if not every:
            conn.sendall(raw)
            return
        for i in range(len(raw)):
            if stop.wait(every):
                return
            conn.sendall(raw[i : i + 1])

    return script


def endless(head: bytes, chunk: bytes = b"x" * 65536) -> Script:
    """Send ``head``, then ``chunk`` after ``chunk`` until the client hangs up."""

    def script(conn: socket.socket, request: Received, stop: threading.Event) -> None:
        conn.sendall(head)
        while not stop.is_set():
            conn.sendall(chunk)

    return script


def response(status: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> bytes:
    """The bytes of a whole HTTP/1.1 answer with a ``Content-Length``."""
    lines = [f"HTTP/1.1 {status} X"]
    merged = {"Content-Length": str(len(body)), "Content-Type": "application/json", **(headers or {})}
    lines += [f"{k}: {v}" for k, v in merged.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class HostileServer:
    """Answers the n-th request with ``scripts[n]`` (the last one for every later request).

    ``requests`` lists what arrived; ``connections`` counts accepted connections. Use as a
    context manager; ``close`` stops every script and joins the threads (bounded).
    """

    def __init__(self, *scripts: Script) -> None:
        assert scripts
        self._scripts = list(scripts)
        self.requests: List[Received] = []
        self.connections = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._threads: List[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(self.requests) >= n:
                return True
            time.sleep(0.005)
        return len(self.requests) >= n

    def close(self) -> None:
        self._stop.set()
        self._accepting.join(5)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buffered = b""
        try:
            while not self._stop.is_set():
                request, buffered = self._read_request(conn, buffered)
                if request is None:
                    return
                with self._lock:
                    n = len(self.requests)
                    self.requests.append(request)
                conn.settimeout(5)
                self._scripts[min(n, len(self._scripts) - 1)](conn, request, self._stop)
                conn.settimeout(0.2)
        except OSError:
            pass  # the client hung up: what hostile servers see all the time
        finally:
            conn.close()

    def _read_request(self, conn: socket.socket, buffered: bytes) -> tuple[Optional[Received], bytes]:
        while b"\r\n\r\n" not in buffered:
            data = self._recv(conn)
            if not data:
                return None, b""
            buffered += data
        head, _, rest = buffered.partition(b"\r\n\r\n")
        line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for item in header_lines:
            name, _, value = item.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        while len(rest) < length:
            data = self._recv(conn)
            if not data:
                return None, b""
            rest += data
        return Received(line, headers, rest[:length]), rest[length:]

    def _recv(self, conn: socket.socket) -> bytes:
        while not self._stop.is_set():
            try:
                return conn.recv(65536)
            except TimeoutError:
                continue
        return b""


def send_and_tighten(
    sender: Any, server: HostileServer, batch: Sequence[bytes], *, by: float
) -> Tuple[Any, float]:
    """``sender.send(batch, deadline)`` on a thread, with a deadline of none that is tightened
    to ``by`` seconds from now once ``server`` has the request: the send's result, and the
    seconds from the tightening to the send's end. Fails when the request never arrives or
    the send is still running 5 s after."""
    from klime._deadline import Deadline

    deadline = Deadline()
    results: List[Any] = []
    worker = threading.Thread(target=lambda: results.append(sender.send(batch, deadline)))
    worker.start()
    assert server.wait_for_requests(1)
    tightened = time.monotonic()
    deadline.tighten(tightened + by)
    worker.join(5)
    assert not worker.is_alive()
    return results[0], time.monotonic() - tightened
