"""klime as an AWS Lambda *internal extension*: the process's one, its thread, and the
state machine that hands each invocation over from the runtime's thread after the response,
before the freeze.

``@klime_lambda(after_response=True)`` (see :mod:`klime.integrations._lambda`) asks
:func:`extension` during Init: the first call makes klime a thread of the runtime process
registered with Lambda's Extensions API (2020-01-01); later calls get the same one. Lambda
then ends an invocation — and may freeze the sandbox — only once the runtime *and* every
registered extension have asked for the next event; so the runtime posts the handler's
result at once (the invoker has it) and klime's thread sends the invocation's events in the
window before its own ``GET /extension/event/next``. Lambda bills that window as
post-runtime duration: it is bounded by the decorator's ``flush_timeout`` and by the
invocation's ``deadlineMs`` minus ``deadline_margin``. Where registering is impossible —
not on Lambda, several invocations at once, a forked process, the registration refused —
:func:`extension` is None, one warning says why, and the decorators send before the handler
returns.

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

Why step 4 watches a frame: awslambdaric's ``handle_event_request`` calls the handler,
marshals its result and posts it, then returns to its loop; it offers no callback after the
post (its only hooks are SnapStart's), and Lambda tells an extension nothing about the
runtime's post. A finalizer on the handler's context would fire only if nothing kept the
context (frameworks keep it; a raised exception's traceback keeps it until a garbage
collection), so klime looks at that thread's stack, briefly and with a bound
(:func:`_wait_returned`), and stops looking after :data:`POST_WAIT_MISSES` misses.

If the runtime never calls the decorated handler for R (a runtime-level failure, or the
function Lambda calls is another one), klime waits at most :data:`BEGIN_GRACE_S` for
:meth:`begin`, not the whole timeout; a wrapper that begins or ends too late for its round
gets False and flushes before returning instead. Registration itself happens on klime's
thread (so that a thread that could not start never leaves Lambda waiting for it); the
decorator waits up to :data:`REGISTER_TIMEOUT_S` for the answer. The Extensions API itself
is spoken by :mod:`._extensions_api`.

May import: the standard library, its sibling ``_extensions_api``, and klime's layers below
the integrations (``Invocation`` of :mod:`klime.integrations._serverless` for types only).
"""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..._logging import log
from ._extensions_api import REGISTER_TIMEOUT_S, ExtensionAPIError, ExtensionsAPI

if TYPE_CHECKING:
    from .._serverless import Invocation

__all__ = ["AFTER_RESPONSE_MARK", "BEGIN_GRACE_S", "EXTENSION_NAME", "LambdaExtension", "extension"]

#: The name klime registers under (``Lambda-Extension-Name``).
EXTENSION_NAME = "klime"
#: Longest wait, after an INVOKE event, for the decorated handler to begin, seconds.
BEGIN_GRACE_S = 1.0
#: Longest wait for the runtime to finish posting the response before flushing anyway.
POST_WAIT_S = 0.5
#: After this many invocations in a row where the runtime's frame never returned within
#: POST_WAIT_S (a runtime klime cannot observe), klime stops waiting for it.
POST_WAIT_MISSES = 3
#: The attribute set (True) on every after-response wrapper, to recognise the one Lambda calls.
AFTER_RESPONSE_MARK = "_klime_after_response"

_monotonic = time.monotonic


# ---------------------------------------------------------------------- the process's one

_lock = threading.Lock()
_extension: Optional[LambdaExtension] = None
_fallback_reason: Optional[str] = None


def _why_not() -> Optional[str]:
    """Why this process cannot register as an extension, or None."""
    if not os.environ.get("AWS_LAMBDA_RUNTIME_API"):
        return "this is not AWS Lambda (AWS_LAMBDA_RUNTIME_API is not set)"
    if os.environ.get("AWS_LAMBDA_MAX_CONCURRENCY"):
        return "Lambda runs this function with several invocations at once (AWS_LAMBDA_MAX_CONCURRENCY)"
    return None


def extension(margin: float) -> Optional[LambdaExtension]:
    """klime's extension, registered on first call (blocks up to REGISTER_TIMEOUT_S) with
    ``margin`` seconds kept back from each deadline, or None when registration is
    impossible — then one warning says why and the decorators send before the handler
    returns. Later calls return the same answer (a process that forked gets None).
    Thread-safe."""
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


# ---------------------------------------------------------------------- the function Lambda calls


def _configured_handler() -> Tuple[Optional[str], Any]:
    """``(_HANDLER, the object it names)``: the function Lambda calls, looked up the way
    awslambdaric does (``module.function``, ``/`` for packages). None when not found."""
    spec = os.environ.get("_HANDLER")
    if not spec or "." not in spec:
        return spec, None
    module_name, _, attribute = spec.rpartition(".")
    module = sys.modules.get(module_name.replace("/", "."))
    return spec, getattr(module, attribute, None) if module is not None else None


def _handler_chain(obj: Any) -> List[Any]:
    """``obj`` and what it wraps (``__wrapped__``, as functools.wraps sets), outermost first."""
    found: List[Any] = []
    for _ in range(16):
        if obj is None or any(obj is seen for seen in found):
            break
        found.append(obj)
        obj = getattr(obj, "__wrapped__", None)
    return found


def _is_after_response_wrapper(handler: Any) -> bool:
    """Whether ``handler`` is (or wraps) an after-response wrapper (:data:`AFTER_RESPONSE_MARK`)."""
    return any(getattr(obj, AFTER_RESPONSE_MARK, False) is True for obj in _handler_chain(handler))


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
    """Whether ``frame`` is ``top`` or one of its callers (bounded walk). Non-blocking."""
    current = top
    for _ in range(500):
        if current is None:
            return False
        if current is frame:
            return True
        current = current.f_back
    return True  # a stack deeper than that: assume still there


def _wait_returned(thread_id: int, frame: types.FrameType, limit: float) -> bool:
    """Wait until ``frame`` is no longer on the stack of thread ``thread_id`` (that call
    has returned), at most until ``limit`` (a ``time.monotonic()``). True if it returned.
    Blocks (polling, briefly); never keeps a reference to the thread's frames."""
    pause = 0.0001
    for _ in range(100000):  # bounded by `limit` too
        frames = sys._current_frames()
        top = frames.get(thread_id)
        del frames
        if not _on_stack(top, frame):
            return True
        del top
        if _monotonic() >= limit:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.002)
    return False


# ---------------------------------------------------------------------- the extension


def _deadline_at(deadline_ms: Any) -> Optional[float]:
    """``deadlineMs`` of an INVOKE event (epoch milliseconds) as a ``time.monotonic()``."""
    if isinstance(deadline_ms, bool) or not isinstance(deadline_ms, (int, float)):
        return None
    left = float(deadline_ms) / 1000.0 - time.time()
    return _monotonic() + left


class _HandOff:
    """What the wrapper hands klime's thread when its handler is done."""

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

    def __init__(self, address: str, *, margin: float) -> None:
        self.api = ExtensionsAPI(address)
        self.margin = margin
        self.state = "starting"
        self.reason: Optional[str] = None
        self.pid = os.getpid()
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
        """Stop accepting invocations (``reason`` says why) and wake whoever waits."""
        with self._cond:
            if self.state in ("starting", "active"):
                self.state = "refused" if self.state == "starting" else "stopped"
                self.reason = reason
            self._cond.notify_all()
        self._registered.set()

    @property
    def active(self) -> bool:
        """Registered, serving, and still the process that registered. Non-blocking."""
        return self.state == "active" and self.pid == os.getpid()

    # -- the wrapper's side (the runtime's thread) ---------------------------------------

    def serves(self, wrapper: Callable[..., Any]) -> bool:
        """Whether ``wrapper`` is (or is wrapped by) the function Lambda calls. Non-blocking."""
        _, handler = _configured_handler()
        return any(obj is wrapper for obj in _handler_chain(handler))

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
            _, handler = _configured_handler()
            frame = _runtime_frame(wrapper_frame, _handler_chain(handler) or [wrapper])
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
        """klime's thread: register, then serve Lambda's events until SHUTDOWN or failure."""
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
        """Ask for each next event (blocks, possibly for hours across a freeze) and serve it."""
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
                self._serve_invoke(event)
            except Exception:
                log.exception("klime: the Lambda extension failed to send an invocation's events")
                with self._cond:
                    self._round = None

    def _give_up(self, exc: BaseException, *, report: bool, during_init: bool) -> None:
        """The Extensions API keeps failing: stop (one warning) and, if ``report``, tell Lambda."""
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
            spec, handler = _configured_handler()
            ours = _is_after_response_wrapper(handler)
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

    def _serve_invoke(self, event: Dict[str, Any]) -> None:
        """One INVOKE event: wait for its hand-over (at most until its deadline, or
        BEGIN_GRACE_S if the handler never begins), for the runtime's post, then flush."""
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
        finally:
            handoff.frame = None

    def _wait_posted(self, handoff: _HandOff, end_at: float) -> None:
        """Until the runtime's frame that called the handler has returned (it posts the
        response before it returns), at most POST_WAIT_S."""
        frame = handoff.frame
        if frame is None or self._post_wait_misses >= POST_WAIT_MISSES:
            return
        if _wait_returned(handoff.thread_id, frame, min(end_at, _monotonic() + POST_WAIT_S)):
            self._post_wait_misses = 0
            return
        self._post_wait_misses += 1
        log.debug("klime: the runtime did not finish posting the response within %.2fs", POST_WAIT_S)
