"""klime as an AWS Lambda *internal extension*: the process's one.

``@klime_lambda(after_response=True)`` asks :func:`extension` during Init: the first call
registers klime with Lambda's Extensions API (a thread of this process, see
:mod:`._extension_thread`, which says how an invocation is handed over and flushed after the
response); later calls get the same one. Where that is impossible — not on Lambda, several
invocations at once, a forked process, the registration refused — it is None, one warning
says why, and the decorators send before the handler returns.

May import: the standard library, its sibling modules and klime's layers below the
integrations.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

from ..._logging import log
from ._extension_thread import DEFAULT_MARGIN_S, LambdaExtension

__all__ = ["extension"]

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
