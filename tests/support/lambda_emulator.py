"""A local AWS Lambda sandbox for tests: the Runtime API (2018-06-01) and the Extensions API
(2020-01-01), driving the real ``awslambdaric`` runtime client.

It runs ``python -m awslambdaric module.function`` in a child process (its own process group)
and models what Lambda does around it:

- **Init**: external extensions (executables given in ``external_extensions``) start first
  and must register; then the runtime starts. Internal extensions (threads of the runtime
  process) may register until the runtime first asks for an invocation (``invocation/next``,
  or ``restore/next`` under SnapStart); a later registration is refused (403). Init is
  complete when the runtime and every registered extension have called ``next``. With
  ``init_type="provisioned-concurrency"`` the sandbox is then frozen until the first invoke;
  with ``init_type="snap-start"`` the runtime runs its before-snapshot hooks and calls
  ``restore/next``, where the emulator records the snapshot (:attr:`snapshot_at`).
- **Invoke**: an invocation is handed to the runtime and, as an ``INVOKE`` event (with
  ``requestId`` and ``deadlineMs``, epoch milliseconds), to every extension registered for
  it, at the same moment. The runtime's response goes to the invoker the moment it is posted
  (:meth:`invoke` returns then); the invocation ends (:attr:`Invocation.ended_at`) only when
  the runtime and every extension have called ``next`` again, and only then is the sandbox
  frozen (SIGSTOP of the process groups; SIGCONT before the next invoke). The function's
  deadline covers the whole Invoke phase: at ``deadlineMs`` an invocation that has not ended
  times out (:attr:`Invocation.timed_out`, an error result if none was posted) and the
  sandbox is reset (the runtime is killed, as Lambda discards it).
- **Errors**: ``/extension/init/error`` fails Init (:meth:`start` raises
  :class:`LambdaInitError`); ``/extension/exit/error`` marks the extension failed: no later
  call of it succeeds, the current invocation no longer waits for it, and the sandbox is
  reset when that invocation ends. Either way further calls from that extension get 403.
- **Shutdown**: :meth:`stop` sends SIGTERM to the runtime (after SIGCONT), then a
  ``SHUTDOWN`` event (``shutdownReason: "spindown"``) to every external extension that
  registered for it, and waits up to 2 s for them to exit. Internal extensions cannot
  register for SHUTDOWN (400).

Standard library only; Python 3.9+. Error type names in refusals are the emulator's own.

    with LambdaEmulator("my_module.handler", cwd=path) as emu:   # start()ed
        inv = emu.invoke({"x": 1})
        assert inv.ok, inv.payload
        assert emu.wait_ended(inv) and emu.wait_frozen()

What awslambdaric (4.x, C++ client underneath) needs from the API:
``Lambda-Runtime-Aws-Request-Id`` (mandatory) and ``Lambda-Runtime-Deadline-Ms``
(epoch ms; ``context.get_remaining_time_in_millis()`` is computed from it) on
``GET /next``; ``Lambda-Runtime-Invoked-Function-Arn`` and
``Lambda-Runtime-Trace-Id`` are passed through to the context / the
``_X_AMZN_TRACE_ID`` env var. ``/response`` and ``/error`` must answer 202
(anything else makes the runtime raise and exit). The C++ client posts
``/error`` WITHOUT ``Lambda-Runtime-Function-Error-Type`` (only
``/init/error``, posted from Python, carries it), so ``Invocation.error_type``
falls back to the ``errorType`` field of the error body. The context reads
``AWS_LAMBDA_FUNCTION_NAME``, ``AWS_LAMBDA_FUNCTION_VERSION``,
``AWS_LAMBDA_FUNCTION_MEMORY_SIZE``, ``AWS_LAMBDA_LOG_GROUP_NAME`` and
``AWS_LAMBDA_LOG_STREAM_NAME`` from the environment; ``AWS_EXECUTION_ENV`` set
to ``AWS_Lambda_python3.12`` or later switches the client to polling ``next``
from a thread (as on real Lambda), and ``AWS_LAMBDA_MAX_CONCURRENCY`` would
switch it to the multi-concurrency mode, so that one is removed from the
inherited environment. With ``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`` the
client runs the ``snapshot_restore_py`` before-snapshot hooks, then calls
``GET /runtime/restore/next`` (200 expected), then the after-restore hooks.
"""

from __future__ import annotations

import atexit
import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "ExtensionRecord",
    "Invocation",
    "LambdaEmulator",
    "LambdaEmulatorError",
    "LambdaInitError",
    "RuntimeExitedError",
]

_API = "/2018-06-01/runtime"
_NEXT = _API + "/invocation/next"
_INVOCATION_PREFIX = _API + "/invocation/"
_INIT_ERROR = _API + "/init/error"
_RESTORE_NEXT = _API + "/restore/next"
_RESTORE_ERROR = _API + "/restore/error"
_ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"

_EXT_API = "/2020-01-01/extension"
_EXT_REGISTER = _EXT_API + "/register"
_EXT_NEXT = _EXT_API + "/event/next"
_EXT_INIT_ERROR = _EXT_API + "/init/error"
_EXT_EXIT_ERROR = _EXT_API + "/exit/error"
_EXT_NAME_HEADER = "Lambda-Extension-Name"
_EXT_ID_HEADER = "Lambda-Extension-Identifier"
_EXT_ERROR_TYPE_HEADER = "Lambda-Extension-Function-Error-Type"
_EXT_EVENT_TYPES = ("INVOKE", "SHUTDOWN")
_MAX_EXTENSIONS = 10
#: Lambda's Shutdown phase with external extensions lasts at most 2 s.
_SHUTDOWN_LIMIT_S = 2.0

INIT_TYPES = ("on-demand", "provisioned-concurrency", "snap-start")

# Environment variables inherited from the test process that would change how
# awslambdaric behaves (multi-concurrency mode, telemetry fd, SnapStart).
_SCRUBBED_ENV = (
    "AWS_LAMBDA_MAX_CONCURRENCY",
    "_LAMBDA_TELEMETRY_LOG_FD",
    "_LAMBDA_TELEMETRY_LOG_FD_PROVIDER_SOCKET",
    "AWS_LAMBDA_INITIALIZATION_TYPE",
    "_X_AMZN_TRACE_ID",
)


class LambdaEmulatorError(RuntimeError):
    """The runtime could not be started or did not answer as expected."""


class LambdaInitError(LambdaEmulatorError):
    """Init failed: the runtime posted /runtime/init/error (e.g. the handler import failed)
    or an extension posted /extension/init/error."""


class RuntimeExitedError(LambdaEmulatorError):
    """The runtime process exited (or the sandbox was reset after a timeout or an
    extension's exit error)."""


@dataclass
class Invocation:
    request_id: str
    ok: bool  # True for /response, False for /error (or a timeout)
    payload: Any  # parsed JSON response body (or error body)
    error_type: Optional[str]  # Lambda-Runtime-Function-Error-Type (or errorType of the body)
    invoked_at: float  # time.monotonic() when handed to the runtime
    responded_at: float  # time.monotonic() when the response/error POST was received
    duration: float  # responded_at - invoked_at: what the invoker waited
    deadline_at: float = 0.0  # time.monotonic() of the invocation's deadline (deadlineMs)
    #: time.monotonic() when the runtime and every extension had called next again (the
    #: Invoke phase ended; the sandbox may freeze from then on); None while it runs.
    ended_at: Optional[float] = None
    timed_out: bool = False  # the deadline passed before the Invoke phase ended

    @property
    def post_runtime(self) -> Optional[float]:
        """Seconds between the response and the end of the Invoke phase (billed as
        post-runtime duration on Lambda), None while the phase runs."""
        return None if self.ended_at is None else max(0.0, self.ended_at - self.responded_at)


@dataclass
class ExtensionRecord:
    """One registered extension, as the emulator sees it."""

    name: str
    identifier: str
    events: Tuple[str, ...]
    external: bool
    registered_at: float
    #: "registered" (never called next), "waiting" (blocked in next), "busy" (got an event,
    #: has not called next since), "failed" (posted init/exit error), "gone" (shut down)
    state: str = "registered"
    next_calls: int = 0
    received: List[Dict[str, Any]] = field(default_factory=list)  # events handed to it
    error: Optional[Tuple[str, str, Any]] = None  # (endpoint, error type, body)
    _slot: Optional[Dict[str, Any]] = None


class _Pending:
    __slots__ = (
        "request_id",
        "body",
        "remaining_ms",
        "trace_id",
        "invoked_at",
        "deadline_at",
        "deadline_epoch_ms",
        "result",
        "abandoned",
        "ended_at",
        "timed_out",
    )

    def __init__(self, request_id: str, body: bytes, remaining_ms: int, trace_id: str):
        self.request_id = request_id
        self.body = body
        self.remaining_ms = remaining_ms
        self.trace_id = trace_id
        self.invoked_at: Optional[float] = None
        self.deadline_at = 0.0
        self.deadline_epoch_ms = 0
        self.result: Optional[Invocation] = None
        self.abandoned = False
        self.ended_at: Optional[float] = None
        self.timed_out = False


def _parse_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")


def _trace_id() -> str:
    return "Root=1-%08x-%s;Parent=%s;Sampled=0" % (
        int(time.time()),
        secrets.token_hex(12),
        secrets.token_hex(8),
    )


def _task_states(pid: int) -> Optional[List[str]]:
    """State letters ('T' = stopped) of all threads of pid, None without /proc."""
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return None
    states = []
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/stat" % (pid, tid), "rb") as f:
                data = f.read()
        except OSError:
            continue  # thread gone
        # "tid (comm) S ..." -- comm may contain spaces/parentheses.
        k = data.rfind(b")")
        if k >= 0:
            states.append(data[k + 2 : k + 3].decode())
    return states


def _wait_tasks(pid: int, predicate: Any, timeout: float) -> bool:
    """Poll until predicate(state) holds for every thread of pid (True without /proc)."""
    deadline = time.monotonic() + timeout
    while True:
        states = _task_states(pid)
        if states is None or all(predicate(st) for st in states):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.0005)


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle on, the body
    # waits for the client's delayed ACK (~40 ms per invocation).
    disable_nagle_algorithm = True
    server_version = "klime-lambda-emulator"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- plumbing ---------------------------------------------------------
    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until the empty line
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, code: int, body: bytes = b"", headers: Optional[Dict[str, str]] = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body and not (headers and "Content-Type" in headers):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, code: int, obj: Any, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(code, json.dumps(obj).encode(), headers)

    def _refuse(self, code: int, error_type: str, message: str) -> None:
        self._send_json(code, {"errorType": error_type, "errorMessage": message})

    # -- routes -------------------------------------------------------------
    def do_GET(self) -> None:
        emu: LambdaEmulator = self.server.emulator  # type: ignore[attr-defined]
        if self.path == _NEXT:
            self._runtime_next(emu)
        elif self.path == _EXT_NEXT:
            self._extension_next(emu)
        elif self.path == _RESTORE_NEXT:
            emu._restore_next()
            self._send(200)
        else:
            self._refuse(404, "NotFound", self.path)

    def _runtime_next(self, emu: LambdaEmulator) -> None:
        pending = emu._next_invocation()
        if pending is None:  # emulator stopping
            self.close_connection = True
            self._refuse(500, "EmulatorStopped", "stopping")
            return
        headers = {
            "Content-Type": "application/json",
            "Lambda-Runtime-Aws-Request-Id": pending.request_id,
            "Lambda-Runtime-Deadline-Ms": str(pending.deadline_epoch_ms),
            "Lambda-Runtime-Invoked-Function-Arn": emu.function_arn,
            "Lambda-Runtime-Trace-Id": pending.trace_id,
        }
        self._send(200, pending.body, headers)

    def _extension_next(self, emu: LambdaEmulator) -> None:
        identifier = self.headers.get(_EXT_ID_HEADER) or ""
        status, event = emu._extension_next(identifier)
        if event is None:
            self.close_connection = True
            self._refuse(status, "Extension.Forbidden" if status == 403 else "EmulatorStopped", "no event")
            return
        self._send_json(200, event, {"Content-Type": "application/json", _EXT_ID_HEADER: identifier})

    def do_POST(self) -> None:
        emu: LambdaEmulator = self.server.emulator  # type: ignore[attr-defined]
        body = self._read_body()
        received = time.monotonic()
        path = self.path
        if path == _INIT_ERROR:
            emu._record_init_error(self.headers.get(_ERROR_TYPE_HEADER), body)
            self._send_json(202, {"status": "OK"})
            return
        if path == _RESTORE_ERROR:
            emu._record_restore_error(self.headers.get(_ERROR_TYPE_HEADER), body)
            self._send_json(202, {"status": "OK"})
            return
        if path.startswith(_EXT_API):
            self._extension_post(emu, path, body)
            return
        if path.startswith(_INVOCATION_PREFIX):
            rest = path[len(_INVOCATION_PREFIX) :]
            request_id, _, kind = rest.partition("/")
            if kind in ("response", "error"):
                error_type = self.headers.get(_ERROR_TYPE_HEADER) if kind == "error" else None
                if emu._record_result(request_id, kind == "response", body, error_type, received):
                    self._send_json(202, {"status": "OK"})
                else:
                    self._refuse(400, "InvalidRequestID", "unknown or finished request " + request_id)
                return
        self._refuse(404, "NotFound", path)

    def _extension_post(self, emu: LambdaEmulator, path: str, body: bytes) -> None:
        if path == _EXT_REGISTER:
            name = self.headers.get(_EXT_NAME_HEADER) or ""
            feature = self.headers.get("Lambda-Extension-Accept-Feature") or ""
            status, answer, identifier = emu._register_extension(name, _parse_body(body), feature)
            headers = {_EXT_ID_HEADER: identifier} if identifier else None
            self._send_json(status, answer, headers)
            return
        if path in (_EXT_INIT_ERROR, _EXT_EXIT_ERROR):
            identifier = self.headers.get(_EXT_ID_HEADER) or ""
            error_type = self.headers.get(_EXT_ERROR_TYPE_HEADER) or ""
            status = emu._record_extension_error(
                identifier, "init" if path == _EXT_INIT_ERROR else "exit", error_type, _parse_body(body)
            )
            if status == 202:
                self._send_json(202, {"status": "OK"}, {_EXT_ID_HEADER: identifier})
            elif status == 400:
                self._refuse(400, "Extension.InvalidRequest", "missing Lambda-Extension-Function-Error-Type")
            else:
                self._refuse(403, "Extension.Forbidden", "unknown or failed extension")
            return
        self._refuse(404, "NotFound", path)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    emulator: LambdaEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections die when the runtime is stopped/killed; nothing to report.
        pass


_LIVE: set[LambdaEmulator] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_all() -> None:
    with _LIVE_LOCK:
        live = list(_LIVE)
    for emu in live:
        try:
            emu.stop()
        except Exception:
            pass


class LambdaEmulator:
    """One Lambda sandbox: a real awslambdaric runtime fed by a local Runtime API and
    Extensions API. Thread-safe; :meth:`invoke` calls are serialised."""

    def __init__(
        self,
        handler: str,
        *,
        cwd: Union[str, os.PathLike[str], None] = None,
        env: Optional[Dict[str, str]] = None,
        function_name: str = "klime-test",
        timeout_s: float = 30.0,
        memory_mb: int = 128,
        freeze: bool = True,
        python: str = sys.executable,
        log_path: Optional[str] = None,
        term_timeout: float = 3.0,
        init_type: str = "on-demand",
        external_extensions: Sequence[str] = (),
    ) -> None:
        if init_type not in INIT_TYPES:
            raise ValueError("init_type must be one of %s" % (INIT_TYPES,))
        self.handler = handler
        self.cwd = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
        self.env = dict(env or {})
        self.function_name = function_name
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.freeze = bool(freeze)
        self.python = python
        self.term_timeout = float(term_timeout)
        self.init_type = init_type
        self.external_extensions = [os.path.abspath(p) for p in external_extensions]
        self.region = self.env.get("AWS_REGION", "us-east-1")
        self.function_arn = "arn:aws:lambda:%s:123456789012:function:%s" % (self.region, function_name)
        self.log_path = log_path
        self._own_log = log_path is None
        self._log_cache: Optional[bytes] = None

        self.pid: Optional[int] = None  # type: ignore[assignment]
        self.port: Optional[int] = None
        self.returncode: Optional[int] = None
        self.invocations: List[Invocation] = []  # every result, in order
        self.init_error: Optional[Tuple[Optional[str], Any]] = None  # (error type, body)
        self.restore_error: Optional[Tuple[Optional[str], Any]] = None
        self.extensions: List[ExtensionRecord] = []  # every registration accepted, in order
        self.refused_registrations: List[Tuple[str, int, str]] = []  # (name, status, reason)
        self.init_done_at: Optional[float] = None  # runtime and every extension called next
        self.snapshot_at: Optional[float] = None  # SnapStart: the runtime called restore/next
        self.freezes = 0  # times the sandbox was frozen
        self.frozen_at: Optional[float] = None  # time.monotonic() of the latest freeze
        self.reset_reason: Optional[str] = None  # why the sandbox was reset (killed), if it was

        self._proc: Optional[subprocess.Popen] = None
        self._external_procs: List[subprocess.Popen] = []
        self._server: Optional[_Server] = None
        self._server_thread: Optional[threading.Thread] = None
        self._cond = threading.Condition()
        self._invoke_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._ready = False  # the runtime made its first GET /next
        self._init_over = False  # the runtime asked for its first event (or restore): no more registering
        self._exited = False
        self._stopping = False
        self._stopped = False
        self._started = False
        self._frozen = False
        self._completed = 0  # results posted (response or error)
        self._queued: Optional[_Pending] = None
        self._current: Optional[_Pending] = None  # dispatched, Invoke phase not ended
        self._inflight: Dict[str, _Pending] = {}
        self._runtime_waiting = False  # the runtime is blocked in GET next, nothing handed to it
        self._runtime_slot: Optional[_Pending] = None
        self._by_id: Dict[str, ExtensionRecord] = {}
        self._reset_after_phase: Optional[str] = None
        self.gets = 0  # GET /next requests received from the runtime

    # -- public API ---------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % (self.port or 0)

    def child_env(self) -> Dict[str, str]:
        """The environment the runtime process (and external extensions) get."""
        env = dict(os.environ)
        for key in _SCRUBBED_ENV:
            env.pop(key, None)
        now = time.gmtime()
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_NAME": self.function_name,
                "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
                "AWS_LAMBDA_LOG_GROUP_NAME": "/aws/lambda/" + self.function_name,
                "AWS_LAMBDA_LOG_STREAM_NAME": "%04d/%02d/%02d/[$LATEST]%s"
                % (now.tm_year, now.tm_mon, now.tm_mday, uuid.uuid4().hex),
                "AWS_LAMBDA_INITIALIZATION_TYPE": self.init_type,
                "AWS_EXECUTION_ENV": "AWS_Lambda_python%d.%d" % sys.version_info[:2],
                "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region,
                "_HANDLER": self.handler,
                "LAMBDA_TASK_ROOT": self.cwd,
                "LAMBDA_RUNTIME_DIR": self.cwd,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.env)
        pythonpath = [self.cwd]
        if env.get("PYTHONPATH"):
            pythonpath.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(pythonpath)
        env["AWS_LAMBDA_RUNTIME_API"] = self.address
        return env

    def start(self, ready_timeout: float = 30.0) -> LambdaEmulator:
        """Start the API server, the external extensions and the runtime; return once Init
        is complete (the runtime and every registered extension called next)."""
        if self._started:
            raise LambdaEmulatorError("already started")
        self._started = True
        with _LIVE_LOCK:
            _LIVE.add(self)
        deadline = time.monotonic() + ready_timeout
        try:
            self._start_server()
            self._start_external_extensions(deadline)
            self._start_runtime()
            with self._cond:
                while not (self.init_done_at is not None or self.init_error or self._exited):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                ready, init_error, exited = self.init_done_at is not None, self.init_error, self._exited
                waiting_for = [e.name for e in self.extensions if e.state == "registered"]
        except BaseException:
            self.stop()
            raise
        if ready:
            return self
        if init_error is not None:
            # let the runtime finish writing its log (it exits right after posting)
            self._wait_exit(2.0)
            self.stop()
            raise LambdaInitError(
                "init failed (%s): %s\n--- runtime log ---\n%s"
                % (init_error[0], _short(init_error[1]), self.log_tail())
            )
        self.stop()
        if exited:
            raise RuntimeExitedError(
                "runtime exited with %s before Init completed\n--- runtime log ---\n%s"
                % (self.returncode, self.log_tail())
            )
        raise LambdaEmulatorError(
            "Init did not complete within %.1fs (runtime asked for an event: %s; extensions that "
            "never called next: %s)\n--- runtime log ---\n%s"
            % (ready_timeout, self._ready, waiting_for, self.log_tail())
        )

    def invoke(
        self,
        event: Any,
        *,
        timeout: Optional[float] = None,
        deadline_ms: Optional[int] = None,
    ) -> Invocation:
        """Run one invocation and return its result as soon as the runtime posts it.

        ``event`` is JSON-encoded (bytes/bytearray are sent as is). The
        function's deadline is ``deadline_ms`` (time remaining, ms) or
        ``timeout_s`` from when the invocation is handed out. It is handed out once the
        previous Invoke phase has ended (runtime and extensions called next). Waits at most
        ``timeout`` (default ``timeout_s + 5``) for the response or error.
        """
        if isinstance(event, (bytes, bytearray)):
            body = bytes(event)
        else:
            body = json.dumps(event).encode("utf-8")
        remaining_ms = int(deadline_ms) if deadline_ms is not None else int(self.timeout_s * 1000)
        wait_s = float(timeout) if timeout is not None else self.timeout_s + 5.0
        pending = _Pending(str(uuid.uuid4()), body, remaining_ms, _trace_id())

        with self._invoke_lock:
            deadline = time.monotonic() + wait_s
            with self._cond:
                self._check_usable()
                self._queued = pending
                self._settle_locked()  # hand it out now if the sandbox is idle
                self._cond.notify_all()
                while pending.result is None and not self._exited and not self._stopping:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                result = pending.result
                if result is None:
                    pending.abandoned = True
                    if self._queued is pending:
                        self._queued = None
                    exited, stopping = self._exited, self._stopping
            if result is not None:
                return result
            if exited:
                self._wait_exit(1.0)
                raise RuntimeExitedError(
                    "runtime exited with %s during invocation %s (reset: %s)\n--- runtime log ---\n%s"
                    % (self.returncode, pending.request_id, self.reset_reason, self.log_tail())
                )
            if stopping:
                raise LambdaEmulatorError("emulator stopped during invocation %s" % pending.request_id)
            raise TimeoutError(
                "no response to invocation %s within %.1fs (handed to runtime: %s)\n--- runtime log ---\n%s"
                % (pending.request_id, wait_s, pending.invoked_at is not None, self.log_tail())
            )

    def wait_ended(self, invocation: Invocation, timeout: float = 10.0) -> bool:
        """Wait until ``invocation``'s Invoke phase ended (runtime and every extension
        called next, or it timed out). True when it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while invocation.ended_at is None and not invocation.timed_out and not self._exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return invocation.ended_at is not None

    def wait_frozen(self, timeout: float = 5.0) -> bool:
        """Wait until the sandbox is frozen (after an Invoke phase, or after Init with
        provisioned concurrency)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._frozen and not self._exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._frozen

    def extension(self, name: str) -> Optional[ExtensionRecord]:
        """The registered extension called ``name``, if any."""
        with self._cond:
            for record in self.extensions:
                if record.name == name:
                    return record
        return None

    def stop(self) -> None:
        """Shut the sandbox down: SIGCONT, SIGTERM to the runtime (then SIGKILL), SHUTDOWN
        to external extensions (then SIGKILL), and stop the server. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                self._stop_runtime()
                self._shutdown_external_extensions()
            finally:
                with self._cond:
                    self._stopping = True
                    self._frozen = False
                    self._cond.notify_all()
                if self._server is not None:
                    self._server.shutdown()
                    self._server.server_close()
                self._cache_log()
                with _LIVE_LOCK:
                    _LIVE.discard(self)

    def log_tail(self, n: int = 50) -> str:
        """The last ``n`` lines of the runtime's (and external extensions') stdout/stderr."""
        data = self._log_cache
        if data is None and self.log_path:
            try:
                with open(self.log_path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    size = f.tell()
                    f.seek(max(0, size - 65536))
                    data = f.read()
            except OSError:
                data = None
        if not data:
            return ""
        lines = data.decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    def __enter__(self) -> LambdaEmulator:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return "LambdaEmulator(%r, pid=%s, port=%s, frozen=%s)" % (
            self.handler,
            self.pid,
            self.port,
            self._frozen,
        )

    # -- internals: process ----------------------------------------------------
    def _start_server(self) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.emulator = self
        self._server = server
        self.port = server.server_address[1]
        t = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="lambda-emulator-api",
            daemon=True,
        )
        t.start()
        self._server_thread = t
        threading.Thread(target=self._watch_deadlines, name="lambda-emulator-deadline", daemon=True).start()

    def _log_file(self) -> Any:
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="klime-lambda-", suffix=".log")
            os.close(fd)
        return open(self.log_path, "ab")

    def _start_external_extensions(self, deadline: float) -> None:
        """Extension init: start each external extension; wait until all registered."""
        if not self.external_extensions:
            return
        env = self.child_env()
        for path in self.external_extensions:
            argv = [self.python, path] if path.endswith(".py") else [path]
            log = self._log_file()
            try:
                proc = subprocess.Popen(
                    argv,
                    cwd=self.cwd,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                log.close()
            self._external_procs.append(proc)
        names = {os.path.basename(p) for p in self.external_extensions}
        with self._cond:
            while not names <= {e.name for e in self.extensions if e.external}:
                left = deadline - time.monotonic()
                if left <= 0 or any(p.poll() is not None for p in self._external_procs):
                    raise LambdaEmulatorError(
                        "external extensions did not all register: %s\n--- log ---\n%s"
                        % (sorted(names), self.log_tail())
                    )
                self._cond.wait(min(left, 0.05))

    def _start_runtime(self) -> None:
        log = self._log_file()
        try:
            self._proc = subprocess.Popen(
                [self.python, "-m", "awslambdaric", self.handler],
                cwd=self.cwd,
                env=self.child_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()
        self.pid = self._proc.pid
        threading.Thread(
            target=self._monitor, args=(self._proc,), name="lambda-emulator-monitor", daemon=True
        ).start()

    def _monitor(self, proc: subprocess.Popen) -> None:
        rc = proc.wait()
        with self._cond:
            self.returncode = rc
            self._exited = True
            self._frozen = False
            self._cond.notify_all()

    def _wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._exited

    def _stop_runtime(self) -> None:
        proc = self._proc
        if proc is None:
            return
        pgid = proc.pid  # session leader: pgid == pid
        # Never leave a stopped group behind: continue it before terminating it.
        with self._cond:
            was_frozen, self._frozen = self._frozen, False
            self._signal_all_locked(signal.SIGCONT)
        if was_frozen:
            # Let the threads actually resume before SIGTERM; a process-directed
            # signal sent to a still-stopped group may be taken by a thread
            # other than the main one, and Python's handler would then not run
            # while the main thread stays blocked.
            # (Wait until no thread is stopped, then briefly until they are
            # back in their blocking calls.)
            if _wait_tasks(pgid, lambda st: st not in ("T", "t"), 1.0):
                _wait_tasks(pgid, lambda st: st in ("S", "D", "Z", "X"), 0.05)
        if not self._exited:
            _killpg(pgid, signal.SIGTERM)
            if not self._wait_exit(self.term_timeout):
                _killpg(pgid, signal.SIGKILL)
        # Other members of the group (processes the handler started) go too;
        # the group id stays valid while any member (or the unreaped leader) exists.
        _killpg(pgid, signal.SIGKILL)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - should not happen after SIGKILL
            pass
        self._wait_exit(1.0)
        self.returncode = proc.returncode

    def _shutdown_external_extensions(self) -> None:
        if not self._external_procs:
            return
        now_ms = int(time.time() * 1000)
        with self._cond:
            self._signal_all_locked(signal.SIGCONT)
            for record in self.extensions:
                if record.external and "SHUTDOWN" in record.events and record.state == "waiting":
                    record._slot = {
                        "eventType": "SHUTDOWN",
                        "shutdownReason": "spindown",
                        "deadlineMs": now_ms + int(_SHUTDOWN_LIMIT_S * 1000),
                    }
            self._cond.notify_all()
        deadline = time.monotonic() + _SHUTDOWN_LIMIT_S
        for proc in self._external_procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self._external_procs:
            _killpg(proc.pid, signal.SIGKILL)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover
                pass

    def _cache_log(self) -> None:
        if not self.log_path:
            return
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - 262144))
                data = f.read()
        except OSError:
            return
        if self._own_log:
            self._log_cache = data
            try:
                os.unlink(self.log_path)
            except OSError:
                pass

    # -- internals: freeze -------------------------------------------------------
    def _groups(self) -> List[int]:
        groups = [p.pid for p in self._external_procs if p.poll() is None]
        if self._proc is not None and not self._exited:
            groups.append(self._proc.pid)
        return groups

    def _signal_all_locked(self, sig: int) -> None:
        for pgid in self._groups():
            _killpg(pgid, sig)

    def _freeze_locked(self) -> None:
        if self._frozen or self._proc is None or self._exited:
            return
        groups = self._groups()
        if not any([_killpg(pgid, signal.SIGSTOP) for pgid in groups]):
            return
        # Make `frozen == True` mean "really stopped": wait for the kernel.
        for pgid in groups:
            _wait_tasks(pgid, lambda st: st in ("T", "t", "Z", "X"), 2.0)
        self._frozen = True
        self.freezes += 1
        self.frozen_at = time.monotonic()
        self._cond.notify_all()

    def _thaw_locked(self) -> None:
        if self._frozen:
            self._signal_all_locked(signal.SIGCONT)
        self._frozen = False

    def _check_usable(self) -> None:
        if not self._started or not self._ready:
            raise LambdaEmulatorError("emulator not started")
        if self._stopping or self._stopped:
            raise LambdaEmulatorError("emulator stopped")
        if self.init_error is not None:
            raise LambdaInitError("init failed: %s" % (self.init_error,))
        if self._exited:
            raise RuntimeExitedError(
                "runtime exited with %s (reset: %s)\n--- runtime log ---\n%s"
                % (self.returncode, self.reset_reason, self.log_tail())
            )

    # -- internals: the lifecycle (all under self._cond) ----------------------------
    def _live_extensions(self) -> List[ExtensionRecord]:
        return [e for e in self.extensions if e.state not in ("failed", "gone")]

    def _idle_locked(self) -> bool:
        """The runtime and every live extension are blocked in next with nothing to do."""
        return (
            self._ready
            and self._runtime_waiting
            and self._runtime_slot is None
            and all(e.state == "waiting" and e._slot is None for e in self._live_extensions())
        )

    def _settle_locked(self) -> None:
        """Move the lifecycle on after any change: end Init or the current Invoke phase when
        everyone called next; then hand out a queued invocation, or freeze."""
        if not self._idle_locked():
            return
        now = time.monotonic()
        if self.init_done_at is None:
            self.init_done_at = now
        current = self._current
        if current is not None:
            current.ended_at = now
            if current.result is not None:
                current.result.ended_at = now
            self._current = None
            if self._reset_after_phase is not None:
                self._reset_locked(self._reset_after_phase)
                return
        queued = self._queued
        if queued is not None and not queued.abandoned:
            self._dispatch_locked(queued)
        elif self.freeze and (self._completed > 0 or self.init_type == "provisioned-concurrency"):
            # Lambda freezes the sandbox once everyone is done and no event is waiting.
            self._freeze_locked()
        self._cond.notify_all()

    def _dispatch_locked(self, pending: _Pending) -> None:
        self._queued = None
        self._thaw_locked()
        now = time.monotonic()
        pending.invoked_at = now
        pending.deadline_at = now + pending.remaining_ms / 1000.0
        pending.deadline_epoch_ms = int(time.time() * 1000) + pending.remaining_ms
        self._current = pending
        self._inflight[pending.request_id] = pending
        self._runtime_slot = pending
        event = {
            "eventType": "INVOKE",
            "deadlineMs": pending.deadline_epoch_ms,
            "requestId": pending.request_id,
            "invokedFunctionArn": self.function_arn,
            "tracing": {"type": "X-Amzn-Trace-Id", "value": pending.trace_id},
        }
        for record in self._live_extensions():
            if "INVOKE" in record.events:
                record._slot = dict(event)
        self._cond.notify_all()

    def _reset_locked(self, reason: str) -> None:
        """Lambda discards the sandbox: kill everything (SIGCONT first)."""
        self.reset_reason = reason
        self._frozen = False
        for pgid in self._groups():
            _killpg(pgid, signal.SIGCONT)
            _killpg(pgid, signal.SIGKILL)
        self._cond.notify_all()

    def _watch_deadlines(self) -> None:
        """The function's timeout bounds the whole Invoke phase (runtime + extensions)."""
        with self._cond:
            while not self._stopping:
                current = self._current
                if current is None or self._exited:
                    self._cond.wait(0.5)
                    continue
                left = current.deadline_at - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                current.timed_out = True
                self._current = None
                if current.result is None:
                    self._set_result_locked(
                        current,
                        False,
                        {
                            "errorType": "Sandbox.Timedout",
                            "errorMessage": "Task timed out after %.2f seconds"
                            % (current.remaining_ms / 1000.0),
                        },
                        "Sandbox.Timedout",
                        time.monotonic(),
                    )
                elif current.result is not None:
                    current.result.timed_out = True
                self._reset_locked("timeout of invocation %s" % current.request_id)

    # -- internals: called from the HTTP handler threads ----------------------------
    def _next_invocation(self) -> Optional[_Pending]:
        with self._cond:
            self.gets += 1
            self._ready = True
            self._init_over = True
            self._runtime_waiting = True
            self._runtime_slot = None
            self._cond.notify_all()
            self._settle_locked()
            while self._runtime_slot is None and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            pending = self._runtime_slot
            self._runtime_slot = None
            self._runtime_waiting = False
            self._thaw_locked()  # normally already done by the dispatch
            return pending

    def _extension_next(self, identifier: str) -> Tuple[int, Optional[Dict[str, Any]]]:
        with self._cond:
            record = self._by_id.get(identifier)
            if record is None or record.state in ("failed", "gone"):
                return 403, None
            record.next_calls += 1
            record.state = "waiting"
            self._cond.notify_all()
            self._settle_locked()
            while record._slot is None and not self._stopping and record.state == "waiting":
                self._cond.wait()
            event = record._slot
            if event is None:
                return (403 if record.state in ("failed", "gone") else 500), None
            record._slot = None
            record.received.append(event)
            if event.get("eventType") == "SHUTDOWN":
                record.state = "gone"
            else:
                record.state = "busy"
            return 200, event

    def _register_extension(self, name: str, body: Any, feature: str) -> Tuple[int, Any, Optional[str]]:
        def refuse(status: int, error_type: str, message: str) -> Tuple[int, Any, Optional[str]]:
            self.refused_registrations.append((name, status, message))
            return status, {"errorType": error_type, "errorMessage": message}, None

        with self._cond:
            if not name:
                return refuse(400, "Extension.InvalidRequest", "Lambda-Extension-Name is required")
            events = body.get("events", []) if isinstance(body, dict) else None
            if not isinstance(events, list) or any(e not in _EXT_EVENT_TYPES for e in events):
                return refuse(400, "Extension.InvalidEvent", "events must be a list of INVOKE/SHUTDOWN")
            if self._init_over:
                return refuse(
                    403,
                    "Extension.RegistrationClosed",
                    "extensions can register only during Init, before the runtime's first next",
                )
            if any(e.name == name for e in self.extensions):
                return refuse(409, "Extension.AlreadyRegistered", "an extension named %r exists" % name)
            if len(self.extensions) >= _MAX_EXTENSIONS:
                return refuse(400, "Extension.TooManyExtensions", "at most 10 extensions")
            external = name in {os.path.basename(p) for p in self.external_extensions}
            if not external and "SHUTDOWN" in events:
                return refuse(
                    400, "Extension.InvalidEvent", "internal extensions cannot register for SHUTDOWN"
                )
            record = ExtensionRecord(
                name=name,
                identifier=str(uuid.uuid4()),
                events=tuple(events),
                external=external,
                registered_at=time.monotonic(),
            )
            self.extensions.append(record)
            self._by_id[record.identifier] = record
            self._cond.notify_all()
        answer: Dict[str, Any] = {
            "functionName": self.function_name,
            "functionVersion": "$LATEST",
            "handler": self.handler,
        }
        if "accountId" in feature:
            answer["accountId"] = "123456789012"
        return 200, answer, record.identifier

    def _record_extension_error(self, identifier: str, kind: str, error_type: str, body: Any) -> int:
        with self._cond:
            record = self._by_id.get(identifier)
            if record is None or record.state in ("failed", "gone"):
                return 403
            if not error_type:
                return 400
            if kind == "init" and self.init_done_at is not None:
                return 403  # Init is over: nothing to fail
            record.error = (kind, error_type, body)
            record.state = "failed"
            record._slot = None
            if kind == "init":
                self.init_error = ("Extension.InitError: %s (%s)" % (error_type, record.name), body)
                self._reset_locked("init error of extension %s" % record.name)
            elif self._current is not None:
                self._reset_after_phase = "exit error of extension %s" % record.name
                self._settle_locked()
            else:
                self._reset_locked("exit error of extension %s" % record.name)
            self._cond.notify_all()
            return 202

    def _restore_next(self) -> None:
        """SnapStart: Init ends (every extension called next), the snapshot is taken, the
        environment is restored; then the runtime gets its answer."""
        with self._cond:
            self._init_over = True
            deadline = time.monotonic() + 10.0  # Lambda's limit for the restore phase
            while not self._stopping and not all(e.state == "waiting" for e in self._live_extensions()):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            self.snapshot_at = time.monotonic()
            self._cond.notify_all()

    def _set_result_locked(
        self, pending: _Pending, ok: bool, payload: Any, error_type: Optional[str], received: float
    ) -> Invocation:
        invoked_at = pending.invoked_at if pending.invoked_at is not None else received
        result = Invocation(
            request_id=pending.request_id,
            ok=ok,
            payload=payload,
            error_type=error_type,
            invoked_at=invoked_at,
            responded_at=received,
            duration=received - invoked_at,
            deadline_at=pending.deadline_at,
            ended_at=pending.ended_at,
            timed_out=pending.timed_out,
        )
        pending.result = result
        self._inflight.pop(pending.request_id, None)
        self._completed += 1
        self.invocations.append(result)
        self._cond.notify_all()
        return result

    def _record_result(
        self, request_id: str, ok: bool, body: bytes, error_type: Optional[str], received: float
    ) -> bool:
        payload = _parse_body(body)
        if not ok and not error_type and isinstance(payload, dict):
            error_type = payload.get("errorType")
        with self._cond:
            pending = self._inflight.get(request_id)
            if pending is None or pending.result is not None:
                return False
            self._set_result_locked(pending, ok, payload, error_type, received)
            return True

    def _record_init_error(self, error_type: Optional[str], body: bytes) -> None:
        payload = _parse_body(body)
        if not error_type and isinstance(payload, dict):
            error_type = payload.get("errorType")
        with self._cond:
            self.init_error = (error_type, payload)
            self._cond.notify_all()

    def _record_restore_error(self, error_type: Optional[str], body: bytes) -> None:
        with self._cond:
            self.restore_error = (error_type, _parse_body(body))
            self._cond.notify_all()


def _short(obj: Any, limit: int = 2000) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return text if len(text) <= limit else text[:limit] + "..."
