"""A local AWS Lambda Runtime API (2018-06-01) emulator for tests.

It drives the real ``awslambdaric`` runtime client (``python -m awslambdaric
module.function``) in a child process and models the Lambda freeze: with
``freeze=True`` the runtime's process group gets SIGSTOP as soon as the runtime
asks for the next invocation after it has answered one, and SIGCONT right
before the next invocation is handed to it.

Standard library only; Python 3.9+.

    with LambdaEmulator("my_module.handler", cwd=path) as emu:   # start()ed
        inv = emu.invoke({"x": 1})
        assert inv.ok, inv.payload
        assert emu.wait_frozen()

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
inherited environment.
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
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

__all__ = [
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
_ERROR_TYPE_HEADER = "Lambda-Runtime-Function-Error-Type"

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
    """The runtime posted /runtime/init/error (e.g. the handler import failed)."""


class RuntimeExitedError(LambdaEmulatorError):
    """The runtime process exited."""


@dataclass
class Invocation:
    request_id: str
    ok: bool  # True for /response, False for /error
    payload: Any  # parsed JSON response body (or error body)
    error_type: Optional[str]  # Lambda-Runtime-Function-Error-Type (or errorType of the body)
    invoked_at: float  # time.monotonic() when handed to the runtime
    responded_at: float  # time.monotonic() when the response/error POST was received
    duration: float  # responded_at - invoked_at


class _Pending:
    __slots__ = (
        "request_id",
        "body",
        "remaining_ms",
        "trace_id",
        "invoked_at",
        "result",
        "abandoned",
    )

    def __init__(self, request_id: str, body: bytes, remaining_ms: int, trace_id: str):
        self.request_id = request_id
        self.body = body
        self.remaining_ms = remaining_ms
        self.trace_id = trace_id
        self.invoked_at: Optional[float] = None
        self.result: Optional[Invocation] = None
        self.abandoned = False


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

    def _send_json(self, code: int, obj: Any) -> None:
        self._send(code, json.dumps(obj).encode())

    # -- routes -------------------------------------------------------------
    def do_GET(self) -> None:
        emu: LambdaEmulator = self.server.emulator  # type: ignore[attr-defined]
        if self.path != _NEXT:
            self._send_json(404, {"errorType": "NotFound", "errorMessage": self.path})
            return
        pending = emu._next_invocation()
        if pending is None:  # emulator stopping
            self.close_connection = True
            self._send_json(500, {"errorType": "EmulatorStopped", "errorMessage": "stopping"})
            return
        headers = {
            "Content-Type": "application/json",
            "Lambda-Runtime-Aws-Request-Id": pending.request_id,
            "Lambda-Runtime-Deadline-Ms": str(int(time.time() * 1000) + pending.remaining_ms),
            "Lambda-Runtime-Invoked-Function-Arn": emu.function_arn,
            "Lambda-Runtime-Trace-Id": pending.trace_id,
        }
        self._send(200, pending.body, headers)

    def do_POST(self) -> None:
        emu: LambdaEmulator = self.server.emulator  # type: ignore[attr-defined]
        body = self._read_body()
        received = time.monotonic()
        path = self.path
        if path == _INIT_ERROR:
            emu._record_init_error(self.headers.get(_ERROR_TYPE_HEADER), body)
            self._send_json(202, {"status": "OK"})
            return
        if path.startswith(_INVOCATION_PREFIX):
            rest = path[len(_INVOCATION_PREFIX) :]
            request_id, _, kind = rest.partition("/")
            if kind in ("response", "error"):
                error_type = self.headers.get(_ERROR_TYPE_HEADER) if kind == "error" else None
                if emu._record_result(request_id, kind == "response", body, error_type, received):
                    self._send_json(202, {"status": "OK"})
                else:
                    self._send_json(
                        400,
                        {
                            "errorType": "InvalidRequestID",
                            "errorMessage": "unknown or finished request " + request_id,
                        },
                    )
                return
        self._send_json(404, {"errorType": "NotFound", "errorMessage": path})


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
    """One Lambda sandbox: a real awslambdaric runtime fed by a local Runtime API."""

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
    ) -> None:
        self.handler = handler
        self.cwd = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
        self.env = dict(env or {})
        self.function_name = function_name
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.freeze = bool(freeze)
        self.python = python
        self.term_timeout = float(term_timeout)
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

        self._proc: Optional[subprocess.Popen] = None
        self._server: Optional[_Server] = None
        self._server_thread: Optional[threading.Thread] = None
        self._cond = threading.Condition()
        self._invoke_lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._ready = False  # the runtime made its first GET /next
        self._exited = False
        self._stopping = False
        self._stopped = False
        self._started = False
        self._frozen = False
        self._completed = 0  # results posted (response or error)
        self._queued: Optional[_Pending] = None
        self._inflight: Dict[str, _Pending] = {}
        self.gets = 0  # GET /next requests received

    # -- public API ---------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def address(self) -> str:
        return "127.0.0.1:%d" % (self.port or 0)

    def child_env(self) -> Dict[str, str]:
        """The environment the runtime process gets."""
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
                "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
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
        """Start the API server and the runtime; return after its first GET /next."""
        if self._started:
            raise LambdaEmulatorError("already started")
        self._started = True
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._start_server()
            self._start_runtime()
            deadline = time.monotonic() + ready_timeout
            with self._cond:
                while not (self._ready or self.init_error or self._exited):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                ready, init_error, exited = self._ready, self.init_error, self._exited
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
                "runtime init failed (%s): %s\n--- runtime log ---\n%s"
                % (init_error[0], _short(init_error[1]), self.log_tail())
            )
        self.stop()
        if exited:
            raise RuntimeExitedError(
                "runtime exited with %s before asking for an invocation\n--- runtime log ---\n%s"
                % (self.returncode, self.log_tail())
            )
        raise LambdaEmulatorError(
            "runtime did not ask for an invocation within %.1fs\n--- runtime log ---\n%s"
            % (ready_timeout, self.log_tail())
        )

    def invoke(
        self,
        event: Any,
        *,
        timeout: Optional[float] = None,
        deadline_ms: Optional[int] = None,
    ) -> Invocation:
        """Run one invocation and return its result.

        ``event`` is JSON-encoded (bytes/bytearray are sent as is). The
        function's deadline is ``deadline_ms`` (time remaining, ms) or
        ``timeout_s`` from when the runtime gets the event. Waits at most
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
                # Thaw first, then hand the invocation to the (pending) GET.
                self._thaw_locked()
                self._queued = pending
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
                    "runtime exited with %s during invocation %s\n--- runtime log ---\n%s"
                    % (self.returncode, pending.request_id, self.log_tail())
                )
            if stopping:
                raise LambdaEmulatorError("emulator stopped during invocation %s" % pending.request_id)
            raise TimeoutError(
                "no response to invocation %s within %.1fs (handed to runtime: %s)\n--- runtime log ---\n%s"
                % (pending.request_id, wait_s, pending.invoked_at is not None, self.log_tail())
            )

    def wait_frozen(self, timeout: float = 5.0) -> bool:
        """Wait until the runtime is frozen (after answering an invocation)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._frozen and not self._exited:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._frozen

    def stop(self) -> None:
        """Stop the runtime (SIGCONT, SIGTERM, then SIGKILL) and the server. Idempotent."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
            try:
                self._stop_runtime()
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
        """The last ``n`` lines of the runtime's stdout/stderr."""
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

    def _start_runtime(self) -> None:
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="klime-lambda-", suffix=".log")
            os.close(fd)
        log = open(self.log_path, "ab")
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
        _killpg(pgid, signal.SIGCONT)
        with self._cond:
            was_frozen, self._frozen = self._frozen, False
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
    def _freeze_locked(self) -> None:
        if self._frozen or self._proc is None or self._exited:
            return
        if not _killpg(self._proc.pid, signal.SIGSTOP):
            return
        # Make `frozen == True` mean "really stopped": wait for the kernel.
        _wait_tasks(self._proc.pid, lambda st: st in ("T", "t", "Z", "X"), 2.0)
        self._frozen = True
        self._cond.notify_all()

    def _thaw_locked(self) -> None:
        if self._frozen and self._proc is not None:
            _killpg(self._proc.pid, signal.SIGCONT)
        self._frozen = False

    def _check_usable(self) -> None:
        if not self._started or not self._ready:
            raise LambdaEmulatorError("emulator not started")
        if self._stopping or self._stopped:
            raise LambdaEmulatorError("emulator stopped")
        if self.init_error is not None:
            raise LambdaInitError("runtime init failed: %s" % (self.init_error,))
        if self._exited:
            raise RuntimeExitedError(
                "runtime exited with %s\n--- runtime log ---\n%s" % (self.returncode, self.log_tail())
            )

    # -- internals: called from the HTTP handler threads ----------------------------
    def _next_invocation(self) -> Optional[_Pending]:
        with self._cond:
            self.gets += 1
            self._ready = True
            self._cond.notify_all()
            if self.freeze and self._completed > 0 and self._queued is None and not self._stopping:
                # Real Lambda freezes the sandbox as soon as the runtime asks
                # for the next event after answering one.
                self._freeze_locked()
            while self._queued is None and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            pending = self._queued
            self._queued = None
            self._thaw_locked()  # normally already done by invoke()
            pending.invoked_at = time.monotonic()
            self._inflight[pending.request_id] = pending
            return pending

    def _record_result(
        self, request_id: str, ok: bool, body: bytes, error_type: Optional[str], received: float
    ) -> bool:
        payload = _parse_body(body)
        if not ok and not error_type and isinstance(payload, dict):
            error_type = payload.get("errorType")
        with self._cond:
            pending = self._inflight.pop(request_id, None)
            if pending is None:
                return False
            invoked_at = pending.invoked_at if pending.invoked_at is not None else received
            result = Invocation(
                request_id=request_id,
                ok=ok,
                payload=payload,
                error_type=error_type,
                invoked_at=invoked_at,
                responded_at=received,
                duration=received - invoked_at,
            )
            pending.result = result
            self._completed += 1
            self.invocations.append(result)
            self._cond.notify_all()
            return True

    def _record_init_error(self, error_type: Optional[str], body: bytes) -> None:
        payload = _parse_body(body)
        if not error_type and isinstance(payload, dict):
            error_type = payload.get("errorType")
        with self._cond:
            self.init_error = (error_type, payload)
            self._cond.notify_all()


def _short(obj: Any, limit: int = 2000) -> str:
    text = obj if isinstance(obj, str) else json.dumps(obj)
    return text if len(text) <= limit else text[:limit] + "..."
