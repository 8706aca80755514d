"""klime as an AWS Lambda *internal extension*: send after the response, before the freeze.

``@klime_lambda(after_response=True)`` (see :mod:`klime.integrations._serverless`) makes
klime a thread of the runtime process registered with Lambda's Extensions API (2020-01-01)
during Init. Lambda then ends an invocation — and may freeze the sandbox — only once the
runtime *and* every registered extension have asked for the next event; so the runtime
posts the handler's result at once (the invoker has it) and klime's thread sends the
invocation's events in the window before its own ``GET /extension/event/next``. Lambda
bills that window as post-runtime duration: it is bounded by the decorator's
``flush_timeout`` and by the invocation's ``deadlineMs`` minus ``deadline_margin``.

Threads and who waits on what (one invocation, request id R):

1. Lambda hands R to the runtime and, as an ``INVOKE`` event, to klime's thread (blocked
   in ``event/next``) at the same moment.
2. The runtime's thread calls the decorated handler: the wrapper calls :meth:`begin`
   (klime will serve R), the handler runs, events wait in the clients' buffers.
3. The handler returns or raises: the wrapper calls :meth:`end` (hands R over: the
   invocation to flush and the runtime's frame that called the handler) and returns at
   once. This may happen before klime's thread even got to read its INVOKE event.
4. klime's thread, which waited for R's hand-over (at most until the deadline), waits
   until the runtime's frame that called the handler has returned — the runtime has
   posted the response by then — then flushes, then calls ``event/next``.

If the runtime never calls the decorated handler for R (a runtime-level failure, or the
function Lambda calls is another one), klime waits at most :data:`BEGIN_GRACE_S` for
:meth:`begin`, not the whole timeout; a wrapper that begins or ends too late for its round
gets False and flushes before returning instead. Registration itself happens on klime's
thread (so that a thread that could not start never leaves Lambda waiting for it); the
decorator waits up to :data:`REGISTER_TIMEOUT_S` for the answer.

SnapStart: events recorded during Init would be in the snapshot and sent again by every
sandbox restored from it, so :func:`install_snapshot_flush` registers a before-snapshot
hook (``snapshot_restore_py``, part of Lambda's Python runtimes) that sends them first.

Standard library and klime only; a tiny ``http.client`` client is enough for the local
Extensions API.
"""

from __future__ import annotations

import http.client
import json
import os
import sys
import threading
import time
import types
import weakref
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..._deadline import Deadline
from ..._logging import log

if TYPE_CHECKING:
    from .._serverless import Invocation

__all__ = [
    "BEGIN_GRACE_S",
    "EXTENSION_NAME",
    "ExtensionAPIError",
    "ExtensionsAPI",
    "LambdaExtension",
    "REGISTER_TIMEOUT_S",
    "extension",
    "install_snapshot_flush",
]

#: The name klime registers under (``Lambda-Extension-Name``).
EXTENSION_NAME = "klime"
#: Longest wait for the Extensions API's answer to the registration, seconds.
REGISTER_TIMEOUT_S = 2.0
#: Longest wait, after an INVOKE event, for the decorated handler to begin, seconds.
BEGIN_GRACE_S = 1.0
#: Longest wait for the runtime to finish posting the response before flushing anyway.
POST_WAIT_S = 0.5
#: After this many invocations in a row where the runtime's frame never returned within
#: POST_WAIT_S (a runtime klime cannot observe), klime stops waiting for it.
POST_WAIT_MISSES = 3
#: Time kept back from ``deadlineMs`` when klime waits for the handler, seconds.
DEFAULT_MARGIN_S = 0.25
#: Longest the before-snapshot flush of SnapStart may take, seconds.
SNAPSHOT_FLUSH_TIMEOUT_S = 5.0

_API = "/2020-01-01/extension"
_ID_HEADER = "Lambda-Extension-Identifier"
_ERROR_TYPE_HEADER = "Lambda-Extension-Function-Error-Type"

_monotonic = time.monotonic


class ExtensionAPIError(Exception):
    """The Extensions API answered an error status (``status``, ``detail``)."""

    def __init__(self, endpoint: str, status: int, detail: str) -> None:
        super().__init__(f"{endpoint} answered {status}: {detail}")
        self.endpoint = endpoint
        self.status = status
        self.detail = detail


class ExtensionsAPI:
    """A minimal blocking client of Lambda's Extensions API at ``address`` (``host:port``,
    from ``AWS_LAMBDA_RUNTIME_API``). Not thread-safe: use it from one thread.

    ``next`` blocks without a timeout (Lambda answers when there is an event, possibly
    after a freeze of hours); the other calls time out after ``timeout`` seconds.
    """

    def __init__(self, address: str, *, timeout: float = REGISTER_TIMEOUT_S) -> None:
        self.address = address
        self.timeout = timeout
        self.identifier: Optional[str] = None
        self._next_conn: Optional[http.client.HTTPConnection] = None

    def _request(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        endpoint: str,
        body: Optional[Dict[str, Any]],
        headers: Dict[str, str],
    ) -> Tuple[Any, Dict[str, str]]:
        payload = None if body is None else json.dumps(body).encode("utf-8")
        if payload is not None:
            headers = dict(headers, **{"Content-Type": "application/json"})
        conn.request(method, _API + endpoint, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        if not 200 <= response.status < 300:
            raise ExtensionAPIError(endpoint, response.status, _error_detail(raw))
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return parsed, answer_headers

    def _once(
        self, method: str, endpoint: str, body: Optional[Dict[str, Any]], headers: Dict[str, str]
    ) -> Tuple[Any, Dict[str, str]]:
        conn = http.client.HTTPConnection(self.address, timeout=self.timeout)
        try:
            return self._request(conn, method, endpoint, body, headers)
        finally:
            conn.close()

    def register(self, name: str, events: List[str]) -> str:
        """``POST /extension/register``; returns (and keeps) the extension identifier.
        Raises ExtensionAPIError (refused) or OSError (unreachable). Blocks."""
        _, headers = self._once("POST", "/register", {"events": events}, {"Lambda-Extension-Name": name})
        identifier = headers.get(_ID_HEADER.lower())
        if not identifier:
            raise ExtensionAPIError("/register", 200, "no Lambda-Extension-Identifier in the answer")
        self.identifier = identifier
        return identifier

    def next(self) -> Dict[str, Any]:
        """``GET /extension/event/next``: block until Lambda has an event for us (an INVOKE,
        or a SHUTDOWN for external extensions). A dropped keep-alive connection is retried
        once on a new one. Raises ExtensionAPIError or OSError."""
        for attempt in (1, 2):
            conn = self._next_conn
            if conn is None:
                conn = self._next_conn = http.client.HTTPConnection(self.address)  # no timeout
            try:
                event, _ = self._request(
                    conn, "GET", "/event/next", None, {_ID_HEADER: self.identifier or ""}
                )
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                self.close()
                raise
            if not isinstance(event, dict):
                raise ExtensionAPIError("/event/next", 200, "the event is not a JSON object")
            return event
        raise AssertionError("unreachable")  # pragma: no cover

    def _report(self, endpoint: str, error_type: str, message: str) -> None:
        body = {"errorType": error_type, "errorMessage": message}
        headers = {_ID_HEADER: self.identifier or "", _ERROR_TYPE_HEADER: error_type}
        self._once("POST", endpoint, body, headers)

    def init_error(self, error_type: str, message: str) -> None:
        """``POST /extension/init/error``: Init failed after registering (Lambda fails the
        sandbox's Init). Raises like :meth:`register`. Blocks."""
        self._report("/init/error", error_type, message)

    def exit_error(self, error_type: str, message: str) -> None:
        """``POST /extension/exit/error``: the extension is giving up (Lambda resets the
        sandbox). Raises like :meth:`register`. Blocks."""
        self._report("/exit/error", error_type, message)

    def close(self) -> None:
        conn, self._next_conn = self._next_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def _error_detail(raw: bytes) -> str:
    try:
        payload = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")
    if isinstance(payload, dict):
        kind, message = payload.get("errorType"), payload.get("errorMessage")
        return f"{kind}: {message}" if kind or message else json.dumps(payload)[:200]
    return str(payload)[:200]


def _deadline_at(deadline_ms: Any) -> Optional[float]:
    """``deadlineMs`` of an INVOKE event (epoch milliseconds) as a ``time.monotonic()``."""
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)):
        return None
    left = float(deadline_ms) / 1000.0 - time.time()
    return _monotonic() + left


# ------------------------------------------------------------------ the handler's side

#: Every after-response wrapper made in this process (to recognise the one Lambda calls).
_WRAPPERS: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


def remember_wrapper(wrapper: Callable[..., Any]) -> None:
    """Note ``wrapper`` as an after-response wrapper. Thread-safe enough (WeakSet.add)."""
    _WRAPPERS.add(wrapper)


def configured_handler() -> Tuple[Optional[str], Any]:
    """``(_HANDLER, the object it names)``: the function Lambda calls, looked up the way
    awslambdaric does (``module.function``, ``/`` for packages). None when not found."""
    spec = os.environ.get("_HANDLER")
    if not spec or "." not in spec:
        return spec, None
    module_name, _, attribute = spec.rpartition(".")
    module = sys.modules.get(module_name.replace("/", "."))
    return spec, getattr(module, attribute, None) if module is not None else None


def _chain(obj: Any) -> List[Any]:
    """``obj`` and what it wraps (``__wrapped__``, as functools.wraps sets), outermost first."""
    found: List[Any] = []
    for _ in range(16):
        if obj is None or any(obj is seen for seen in found):
            break
        found.append(obj)
        obj = getattr(obj, "__wrapped__", None)
    return found


def _runtime_frame(wrapper_frame: Optional[types.FrameType], chain: List[Any]) -> Optional[types.FrameType]:
    """The frame that called the function Lambda calls: above the wrapper's own frame and
    the frames of the decorators around it (those in ``chain`` that are plain functions)."""
    codes = {getattr(obj, "__code__", None) for obj in chain}
    codes.discard(None)
    frame = wrapper_frame
    for _ in range(len(chain) + 2):
        if frame is None or frame.f_code not in codes:
            return frame
        frame = frame.f_back
    return frame


def _on_stack(top: Optional[types.FrameType], frame: types.FrameType) -> bool:
    current = top
    for _ in range(500):
        if current is None:
            return False
        if current is frame:
            return True
        current = current.f_back
    return True  # a stack deeper than that: assume still there


class _HandOff:
    __slots__ = ("frame", "invocation", "request_id", "thread_id")

    def __init__(
        self, request_id: str, invocation: Invocation, frame: Optional[types.FrameType], thread_id: int
    ) -> None:
        self.request_id = request_id
        self.invocation = invocation
        self.frame = frame
        self.thread_id = thread_id


class _Round:
    """One INVOKE event served by klime's thread."""

    __slots__ = ("end_at", "handoff", "request_id", "started", "state")

    def __init__(self, request_id: str, end_at: float) -> None:
        self.request_id = request_id
        self.end_at = end_at
        self.started = _monotonic()
        self.state = "waiting"  # -> "running" (begun) -> "handed" (ended); or "closed"
        self.handoff: Optional[_HandOff] = None


class LambdaExtension:
    """klime's internal extension: one per process (see :func:`extension`).

    ``state``: ``"starting"`` (registering), ``"active"`` (serving invocations),
    ``"refused"`` (registration impossible; ``reason`` says why), ``"stopped"`` (the
    Extensions API failed later). Only while active do :meth:`begin`/:meth:`end` accept an
    invocation. All methods are thread-safe; :meth:`start` blocks up to
    :data:`REGISTER_TIMEOUT_S`, :meth:`begin` and :meth:`end` never block nor raise.
    """

    def __init__(self, address: str, *, margin: float = DEFAULT_MARGIN_S) -> None:
        self.api = ExtensionsAPI(address)
        self.margin = margin
        self.state = "starting"
        self.reason: Optional[str] = None
        self.pid = os.getpid()
        self.served = 0  # invocations flushed after their response
        self._cond = threading.Condition(threading.Lock())
        self._registered = threading.Event()
        self._round: Optional[_Round] = None
        self._early_begin: Optional[str] = None  # begun before our INVOKE event was read
        self._early_handoff: Optional[_HandOff] = None  # ended before it was read
        self._handler_checked: Optional[bool] = None
        self._post_wait_misses = 0
        self._thread: Optional[threading.Thread] = None

    # -- life cycle ----------------------------------------------------------------

    def start(self) -> bool:
        """Start klime's thread, which registers; wait for the answer. True when
        registered (``state == "active"``); else ``reason`` says why. Blocks."""
        thread = threading.Thread(target=self._run, name="klime-lambda-extension", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:
            self._refuse(f"klime could not start its extension thread ({exc})")
            return False
        self._thread = thread
        if not self._registered.wait(REGISTER_TIMEOUT_S):
            self._refuse(
                f"the Lambda Extensions API did not answer the registration within {REGISTER_TIMEOUT_S:g}s"
            )
        with self._cond:
            return self.state == "active"

    def _refuse(self, reason: str) -> None:
        with self._cond:
            if self.state in ("starting", "active"):
                self.state = "refused" if self.state == "starting" else "stopped"
                self.reason = reason
            self._cond.notify_all()
        self._registered.set()

    @property
    def active(self) -> bool:
        return self.state == "active" and self.pid == os.getpid()

    # -- the wrapper's side (the runtime's thread) ---------------------------------------

    def serves(self, wrapper: Callable[..., Any]) -> bool:
        """Whether ``wrapper`` is (or is wrapped by) the function Lambda calls. Non-blocking."""
        _, handler = configured_handler()
        return any(obj is wrapper for obj in _chain(handler))

    def begin(self, wrapper: Callable[..., Any], request_id: Optional[str]) -> bool:
        """A decorated handler starts for invocation ``request_id``. True: klime will flush
        it after the response (call :meth:`end` when the handler is done); False: the
        wrapper must flush before returning. Never blocks; never raises."""
        try:
            if not request_id or not self.active or not self.serves(wrapper):
                return False
            with self._cond:
                current = self._round
                if current is None:
                    self._early_begin, self._early_handoff = request_id, None
                    return True
                if current.request_id == request_id and current.state == "waiting":
                    current.state = "running"
                    return True
                return False
        except Exception:
            log.exception("klime: the Lambda extension could not take the invocation")
            return False

    def end(
        self,
        request_id: str,
        invocation: Invocation,
        wrapper_frame: Optional[types.FrameType],
        wrapper: Callable[..., Any],
    ) -> bool:
        """The handler begun with :meth:`begin` returned or raised. True: klime's thread
        flushes ``invocation`` once the runtime has posted the response; False: the
        wrapper must flush now. Never blocks; never raises."""
        try:
            _, handler = configured_handler()
            frame = _runtime_frame(wrapper_frame, _chain(handler) or [wrapper])
            handoff = _HandOff(request_id, invocation, frame, threading.get_ident())
            with self._cond:
                if not self.active:
                    return False
                current = self._round
                if current is None:
                    if self._early_begin != request_id:
                        return False
                    self._early_begin, self._early_handoff = None, handoff
                    return True
                if current.request_id != request_id or current.state != "running":
                    return False
                current.state = "handed"
                current.handoff = handoff
                self._cond.notify_all()
                return True
        except Exception:
            log.exception("klime: the Lambda extension could not take the invocation")
            return False

    # -- klime's thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.api.register(EXTENSION_NAME, ["INVOKE"])
        except ExtensionAPIError as exc:
            hint = ""
            if exc.status == 403:
                hint = " (registration is only possible during Init: apply the decorator at import time)"
            self._refuse(f"the Lambda Extensions API refused the registration: {exc}{hint}")
            return
        except Exception as exc:
            self._refuse(f"klime could not reach the Lambda Extensions API ({type(exc).__name__}: {exc})")
            return
        with self._cond:
            if self.state == "starting":
                self.state = "active"
        self._registered.set()
        log.debug("klime: registered as the Lambda internal extension %r", EXTENSION_NAME)
        self._loop()

    def _loop(self) -> None:
        failures = 0
        first = True
        while True:  # one turn per Lambda event; failures are bounded below
            try:
                event = self.api.next()
            except Exception as exc:
                failures += 1
                status = exc.status if isinstance(exc, ExtensionAPIError) else None
                if failures < 3 and status not in (403, 500):
                    time.sleep(0.05 * failures)
                    continue
                self._give_up(exc, report=status not in (403, 500), during_init=first)
                return
            failures = 0
            first = False
            kind = event.get("eventType")
            if kind == "SHUTDOWN":
                self._refuse("Lambda is shutting the sandbox down")
                return
            if kind != "INVOKE":
                continue
            try:
                self._serve(event)
            except Exception:
                log.exception("klime: the Lambda extension failed to send an invocation's events")
                with self._cond:
                    self._round = None

    def _give_up(self, exc: BaseException, *, report: bool, during_init: bool) -> None:
        reason = f"the Lambda Extensions API failed ({type(exc).__name__}: {exc})"
        with self._cond:
            self.state = "stopped"
            self.reason = reason
            self._round = None
            self._cond.notify_all()
        log.warning_once(
            "lambda-extension-stopped",
            "klime: %s; from now on events are sent before the handler returns",
            reason,
        )
        if report:
            try:
                if during_init:
                    self.api.init_error("Extension.KlimeFailed", reason)
                else:
                    self.api.exit_error("Extension.KlimeFailed", reason)
            except Exception:
                pass

    def _handler_is_ours(self) -> bool:
        """Once, after Init: is the function Lambda calls an after-response wrapper?"""
        if self._handler_checked is None:
            spec, handler = configured_handler()
            ours = any(obj in _WRAPPERS for obj in _chain(handler))
            self._handler_checked = ours
            if not ours:
                log.warning_once(
                    "after-response-fallback",
                    "klime: the function Lambda calls (_HANDLER=%s) is not the one decorated with "
                    "@klime_lambda(after_response=True); events are sent before the handler returns "
                    "instead",
                    spec,
                )
        return self._handler_checked

    def _serve(self, event: Dict[str, Any]) -> None:
        request_id = str(event.get("requestId") or "")
        deadline = _deadline_at(event.get("deadlineMs"))
        end_at = (deadline if deadline is not None else _monotonic() + 900.0) - self.margin
        if not self._handler_is_ours():
            return
        current = _Round(request_id, end_at)
        with self._cond:
            if self._early_handoff is not None and self._early_handoff.request_id == request_id:
                current.state, current.handoff = "handed", self._early_handoff
            elif self._early_begin == request_id:
                current.state = "running"
            self._early_begin = self._early_handoff = None
            self._round = current
            for _ in range(100000):  # each turn waits; bounded by the deadline anyway
                if current.state == "handed" or self.state != "active":
                    break
                now = _monotonic()
                limit = end_at
                if current.state == "waiting":
                    limit = min(limit, current.started + BEGIN_GRACE_S)
                if now >= limit:
                    break
                self._cond.wait(limit - now)
            handoff = current.handoff
            current.state = "closed"
            self._round = None
        if handoff is None:
            return
        try:
            self._wait_posted(handoff, end_at)
            handoff.frame = None
            handoff.invocation.flush(until=end_at)
            self.served += 1
        finally:
            handoff.frame = None

    def _wait_posted(self, handoff: _HandOff, end_at: float) -> None:
        """Until the runtime's frame that called the handler has returned (it posts the
        response before it returns), at most POST_WAIT_S."""
        frame = handoff.frame
        if frame is None or self._post_wait_misses >= POST_WAIT_MISSES:
            return
        limit = min(end_at, _monotonic() + POST_WAIT_S)
        pause = 0.0001
        for _ in range(100000):  # bounded by `limit` too
            frames = sys._current_frames()
            top = frames.get(handoff.thread_id)
            del frames
            if not _on_stack(top, frame):
                self._post_wait_misses = 0
                return
            del top
            if _monotonic() >= limit:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.002)
        self._post_wait_misses += 1
        log.debug("klime: the runtime did not finish posting the response within %.2fs", POST_WAIT_S)


# ------------------------------------------------------------------ the process's one

_lock = threading.Lock()
_extension: Optional[LambdaExtension] = None
_fallback_reason: Optional[str] = None


def _why_not() -> Optional[str]:
    if not os.environ.get("AWS_LAMBDA_RUNTIME_API"):
        return "this is not AWS Lambda (AWS_LAMBDA_RUNTIME_API is not set)"
    if os.environ.get("AWS_LAMBDA_MAX_CONCURRENCY"):
        return "Lambda runs this function with several invocations at once (AWS_LAMBDA_MAX_CONCURRENCY)"
    return None


def extension(margin: float = DEFAULT_MARGIN_S) -> Optional[LambdaExtension]:
    """klime's extension, registered on first call (blocks up to REGISTER_TIMEOUT_S), or
    None when registration is impossible — then one warning says why and the decorators
    send before the handler returns. Later calls return the same answer (a process
    that forked gets None). Thread-safe."""
    global _extension, _fallback_reason
    with _lock:
        current = _extension
        if current is not None and current.pid == os.getpid():
            if current.state == "active":
                current.margin = max(current.margin, margin)
                return current
            return None
        if current is not None and current.pid != os.getpid():
            reason: Optional[str] = "this process was forked from the one registered as the extension"
        else:
            reason = _fallback_reason if current is None else current.reason
        if current is None and reason is None:
            reason = _why_not()
            if reason is None:
                current = LambdaExtension(os.environ["AWS_LAMBDA_RUNTIME_API"], margin=margin)
                _extension = current
                if current.start():
                    return current
                reason = current.reason
            _fallback_reason = reason
    log.warning_once(
        "after-response-fallback",
        "klime: @klime_lambda(after_response=True) cannot send after the response: %s; events "
        "are sent before the handler returns instead",
        reason,
    )
    return None


def _reset() -> None:
    """Forget the process's extension (tests only)."""
    global _extension, _fallback_reason
    with _lock:
        _extension = None
        _fallback_reason = None


# ------------------------------------------------------------------ SnapStart

_snapshot_hook_installed = False


def install_snapshot_flush(flush_all: Callable[[Optional[float]], Tuple[int, int]]) -> bool:
    """Under SnapStart, register (once) a before-snapshot hook that calls
    ``flush_all(timeout)`` — it returns (sent, unsent) — so that events recorded during
    Init are sent once, before the snapshot, not by every sandbox restored from it.
    Returns whether a hook is registered. Thread-safe; non-blocking."""
    global _snapshot_hook_installed
    with _lock:
        if _snapshot_hook_installed:
            return True
        try:
            import snapshot_restore_py  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError:
            log.warning_once(
                "snapstart-no-hooks",
                "klime: SnapStart is on but snapshot_restore_py is missing: events recorded during "
                "Init may be sent again by every sandbox restored from the snapshot",
            )
            return False

        def klime_before_snapshot() -> None:
            deadline = Deadline.after(SNAPSHOT_FLUSH_TIMEOUT_S)
            try:
                sent, unsent = flush_all(deadline.remaining())
            except Exception:
                log.exception("klime: the before-snapshot flush failed")
                return
            if unsent:
                log.warning(
                    "klime: %d events recorded during Init could not be sent before the SnapStart "
                    "snapshot; every sandbox restored from it will send them (with the same messageId)",
                    unsent,
                )
            log.debug("klime: %d events sent before the snapshot", sent)

        snapshot_restore_py.register_before_snapshot(klime_before_snapshot)
        _snapshot_hook_installed = True
        return True
