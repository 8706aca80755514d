"""The function Lambda calls, seen from inside the runtime process: which one it is
(``_HANDLER``, looked up the way awslambdaric does), whether it is one of klime's
after-response wrappers (or wraps one), which frame of the runtime called it, and when that
call has returned — the runtime posts the response before it returns, so that is when
klime's extension thread may send without delaying the invoker (:mod:`._extension_thread`).

May import: the standard library only.
"""

from __future__ import annotations

import os
import sys
import time
import types
import weakref
from typing import Any, Callable, List, Optional, Tuple

__all__ = [
    "configured_handler",
    "handler_chain",
    "is_ours",
    "remember_wrapper",
    "runtime_frame",
    "wait_returned",
]

_monotonic = time.monotonic

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


def handler_chain(obj: Any) -> List[Any]:
    """``obj`` and what it wraps (``__wrapped__``, as functools.wraps sets), outermost first."""
    found: List[Any] = []
    for _ in range(16):
        if obj is None or any(obj is seen for seen in found):
            break
        found.append(obj)
        obj = getattr(obj, "__wrapped__", None)
    return found


def is_ours(handler: Any) -> bool:
    """Whether ``handler`` is (or wraps) an after-response wrapper of this process."""
    return any(obj in _WRAPPERS for obj in handler_chain(handler))


def runtime_frame(wrapper_frame: Optional[types.FrameType], chain: List[Any]) -> Optional[types.FrameType]:
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


def wait_returned(thread_id: int, frame: types.FrameType, limit: float) -> bool:
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
