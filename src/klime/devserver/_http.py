"""The HTTP server: sockets, request bodies, routing, and carrying out the faults.

One daemon thread per connection (HTTP/1.1 keep-alive). A ``POST /v1/batch`` is read
(:mod:`._bodies`), given its fault by the :class:`FaultSchedule`, answered as
:mod:`._answers` decides, and recorded in :class:`Arrivals`. The faults that act on the
connection are carried out here: resets (RST, via ``SO_LINGER`` 0), black holes, delays
and drips. ``/_klime/...`` goes to :mod:`._control`. :class:`Server` also keeps the open
connections (to count them, to close the idle ones, and to reset them all at stop).

Imports: the standard library, :mod:`klime._config` (the batch path) and the devserver's
:mod:`._answers`, :mod:`._bodies`, :mod:`._control` (its path prefix), :mod:`._faults`,
:mod:`._record` and :mod:`._printer`; never the :class:`Collector` (it hands its parts in).
"""

from __future__ import annotations

import email.utils
import http.server
import socket
import socketserver
import struct
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Sequence

from klime._config import BATCH_PATH

from ._answers import JSON, PHRASES, Refusal, answer_batch, answer_status_fault, error_body
from ._bodies import ClientGone, read_body
from ._control import PREFIX, check_access
from ._faults import DRIP_CHUNK_BYTES, FaultSchedule
from ._printer import Printer
from ._record import Arrivals, RecordedRequest, Visit

__all__ = ["Handler", "Server", "make_server", "shutdown_socket"]

_NO_BODY_STATUSES = frozenset({204, 205, 304})


class Server(http.server.ThreadingHTTPServer):
    """The listening socket and its connections; binds in the constructor.

    ``authorize(header)`` says whether an ``Authorization`` header is accepted;
    ``control(method, target, body)`` answers ``/_klime/...`` (see :func:`._control.control`)
    once :func:`._control.check_access` let the request in, with ``control_key()`` (the
    write key the control endpoints require, or None) read at each request.
    Thread-safe; :meth:`halt` is called once, from the thread that stops the collector.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        *,
        arrivals: Arrivals,
        faults: FaultSchedule,
        printer: Printer,
        authorize: Callable[[str | None], bool],
        control: Callable[[str, str, bytes], bytes],
        control_key: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.arrivals = arrivals
        self.faults = faults
        self.printer = printer
        self.authorize = authorize
        self.control = control
        self.control_key = control_key
        self.stop_event = threading.Event()  # set at halt(): delays and drips end at once
        self.stopping = False
        self._lock = threading.Lock()
        self._handlers: dict[int, Handler] = {}
        self._connections = 0
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS look-up; skip it.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError) or self.stopping:
            return  # the client went away, or we are shutting down
        sys.stderr.write("klime devserver: error while handling a request:\n")
        traceback.print_exc(file=sys.stderr)

    # -- connections ---------------------------------------------------------------------------

    def opened(self, handler: Handler) -> None:
        with self._lock:
            self._connections += 1
            self._handlers[id(handler)] = handler
            stopping = self.stopping
        if stopping:
            shutdown_socket(handler.connection)

    def closed(self, handler: Handler) -> None:
        with self._lock:
            self._handlers.pop(id(handler), None)

    def connection_count(self) -> int:
        """How many TCP connections were accepted so far."""
        with self._lock:
            return self._connections

    def close_idle(self) -> int:
        """Shut down every connection not inside a request; return how many (best effort)."""
        with self._lock:
            idle = [h for h in self._handlers.values() if not h.busy]
        for handler in idle:
            shutdown_socket(handler.connection)
        return len(idle)

    def halt(self) -> None:
        """Stop serving (``serve_forever`` must be running), close the socket and every
        connection; held answers end at once. Blocks until the serving loop has ended."""
        with self._lock:
            self.stopping = True
            handlers = list(self._handlers.values())
        self.stop_event.set()
        self.shutdown()
        self.server_close()
        for handler in handlers:
            shutdown_socket(handler.connection)


class _Server6(Server):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, **parts: Any) -> Server:
    """A :class:`Server` bound to ``host:port`` (IPv6 when ``host`` has a colon)."""
    server_class = _Server6 if ":" in host else Server
    return server_class((host, port), **parts)


def shutdown_socket(sock: socket.socket) -> None:
    """``shutdown(SHUT_RDWR)``, ignoring a socket already gone."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection: handles its requests one after the other (one thread)."""

    protocol_version = "HTTP/1.1"
    server_version = "klime-devserver"
    disable_nagle_algorithm = True
    if TYPE_CHECKING:  # set by socketserver's BaseRequestHandler; its type, narrowed
        server: Server
    busy = False  # inside a request and not yet answered (read by close_idle)
    _visit: Visit | None = None

    def setup(self) -> None:
        super().setup()
        self.server.opened(self)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed(self)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- routing -------------------------------------------------------------------------------

    def _dispatch(self) -> None:
        self.busy = True
        path = self.path.split("?", 1)[0]
        batch = path == BATCH_PATH and self.command == "POST"
        try:
            if path.startswith(PREFIX):
                self._control()
                return
            visit = self._visit = self.server.arrivals.visit(batch=batch)
            if batch:
                self._batch(visit)
            elif path == BATCH_PATH:
                self._refuse(visit, 405, f"{self.command} not allowed; use POST")
            else:
                self._refuse(visit, 404, f"no such endpoint: {path}")
        except ClientGone:
            self.close_connection = True
        finally:
            self.busy = False
            if self._visit is not None:
                self._visit.done()
                self._visit = None

    do_POST = _dispatch
    do_GET = _dispatch
    do_PUT = _dispatch
    do_PATCH = _dispatch
    do_DELETE = _dispatch
    do_HEAD = _dispatch
    do_OPTIONS = _dispatch

    def _refuse(self, visit: Visit, status: int, message: str) -> None:
        try:
            body = self._read_body()
        except Refusal as exc:
            status, message, body = exc.status, exc.message, b""
            self.close_connection = True
        extra = [("Allow", "POST")] if status == 405 else []
        visit.record(self._recorded(body or b"", status, None, time.monotonic()))
        self.server.printer.line(f"-> {status} {self.command} {self.path.split('?', 1)[0]}")
        self._send(status, error_body(message), extra=extra)

    def _control(self) -> None:
        server = self.server
        try:
            check_access(
                self.headers.get,
                bound_host=server.server_name,
                port=server.server_port,
                write_key=server.control_key(),
            )
            body = self._read_body()
            if body is None:
                raise Refusal(413, "control request too large")
            payload = server.control(self.command, self.path, body)
        except Refusal as exc:
            self.close_connection = self.close_connection or exc.close
            self._send(exc.status, error_body(exc.message))
            return
        self._send(200, payload)

    # -- POST /v1/batch ------------------------------------------------------------------------

    def _batch(self, visit: Visit) -> None:
        server = self.server
        printer = server.printer
        fault = server.faults.next()
        name = fault.name if fault is not None else None

        if fault is not None and fault.kind == "reset_before_read":
            visit.record(self._recorded(b"", None, name, visit.started_at))
            printer.line("-> reset before reading (fault)")
            self._abort()
            return
        try:
            body = self._read_body()
        except Refusal as exc:
            visit.record(self._recorded(b"", exc.status, name, time.monotonic()))
            printer.line(f"-> {exc.status} {exc.message}")
            self.close_connection = True
            self._send(exc.status, error_body(exc.message))
            return
        received = time.monotonic()
        raw = body if body is not None else b""

        if fault is not None and fault.kind == "status":
            answer = answer_status_fault(fault)
            visit.record(self._recorded(raw, answer.status, name, received))
            printer.line(f"-> {answer.status} (fault)")
            if fault.delay and server.stop_event.wait(fault.delay):
                self._abort()
                return
            self._send(answer.status, answer.body, content_type=answer.content_type, extra=answer.headers)
            return
        if fault is not None and fault.kind in ("reset_after_read", "blackhole"):
            visit.record(self._recorded(raw, None, name, received))
            if fault.kind == "blackhole":
                printer.line("-> no answer (blackhole fault)")
                server.faults.blackhole_gate().wait()
            else:
                printer.line("-> reset after reading (fault)")
            self._abort()
            return

        # Normal handling; the remaining faults only alter a request that is accepted.
        try:
            answer = answer_batch(
                body,
                authorized=server.authorize(self.headers.get("Authorization")),
                content_type=self.headers.get("Content-Type", ""),
                fault=fault,
            )
        except Refusal as exc:
            visit.record(self._recorded(raw, exc.status, name, received))
            printer.line(f"-> {exc.status} {'bad write key' if exc.status == 401 else exc.message}")
            self._send(exc.status, error_body(exc.message))
            return
        visit.record(self._recorded(raw, 200, name, received), answer.accepted)
        printer.batch(answer.accepted, answer.errors, name)

        if fault is not None and fault.kind == "slow" and fault.delay:
            if server.stop_event.wait(fault.delay):
                self._abort()
                return
        drip = fault.delay if fault is not None and fault.kind == "drip" else None
        self._send(200, answer.body, content_type=answer.content_type, drip=drip)

    # -- I/O -----------------------------------------------------------------------------------

    def _read_body(self) -> bytes | None:
        """The request body (None: over the size limit); see :func:`._bodies.read_body`."""
        body, close = read_body(self.rfile, self.headers)
        if close:
            self.close_connection = True
        return body

    def _send(
        self,
        status: int,
        body: bytes,
        *,
        content_type: str = JSON,
        extra: Sequence[tuple[str, str]] = (),
        drip: float | None = None,
    ) -> None:
        if status in _NO_BODY_STATUSES:
            body = b""
        lines = [
            f"HTTP/1.1 {status} {PHRASES.get(status, 'Unknown')}",
            "Server: klime-devserver",
            "Date: " + _http_date(),
            "Content-Type: " + content_type,
            f"Content-Length: {len(body)}",
        ]
        lines.extend(f"{key}: {value}" for key, value in extra)
        if self.close_connection:
            lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if self.command != "HEAD":
            data += body
        if drip is None:
            self._answered()
            self.wfile.write(data)
            return
        stop = self.server.stop_event
        for start in range(0, len(data), DRIP_CHUNK_BYTES):
            if start and stop.wait(drip):
                self._abort()
                return
            if start + DRIP_CHUNK_BYTES >= len(data):
                self._answered()
            self.wfile.write(data[start : start + DRIP_CHUNK_BYTES])

    def _answered(self) -> None:
        # Called just before the last byte goes out: by the time the client has its answer,
        # the connection is idle and the request no longer counts in flight.
        self.busy = False
        if self._visit is not None:
            self._visit.done()

    def _abort(self) -> None:
        """Reset the connection (RST, thanks to SO_LINGER 0) without answering."""
        self.close_connection = True
        if self._visit is not None:
            self._visit.done()
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        try:
            self.rfile.close()  # drops the makefile() reference, so close() below is real
        except OSError:
            pass
        try:
            self.connection.close()
        except OSError:
            pass

    def _recorded(
        self, body: bytes, status: int | None, fault: str | None, received_at: float
    ) -> RecordedRequest:
        return RecordedRequest(
            method=self.command,
            path=self.path,
            headers=dict(self.headers.items()),
            body=body,
            status=status,
            fault=fault,
            received_at=received_at,
            started_at=self._visit.started_at if self._visit is not None else None,
        )


_date_cache: list[Any] = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[1] = email.utils.formatdate(now, usegmt=True)
        _date_cache[0] = now
    return str(_date_cache[1])
