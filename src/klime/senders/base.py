"""The Sender interface.

A sender delivers one batch somewhere (WHERE) and retries as its destination needs. The
transport that owns the batch (WHEN) may listen to each attempt through a
:data:`Feedback` hook — that is how several requests in flight at once back off together
when the destination struggles — and may ask the sender to stop retrying for now: the
batch then comes back *deferred*, nothing counted, to be sent again later.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

from .._config import MAX_BATCH_EVENTS, MAX_REQUEST_BYTES
from .._deadline import Deadline
from .._models import BatchResponse
from ..errors import SendError

__all__ = [
    "ATTEMPT_OK",
    "ATTEMPT_REJECTED",
    "ATTEMPT_TRANSIENT",
    "Feedback",
    "Sender",
    "SendResult",
    "attempt_outcome",
]

#: The destination took the request (all or some of its events): it is healthy.
ATTEMPT_OK = "ok"
#: The destination failed in a way worth retrying (5xx, 408, 429, a timeout, a reset):
#: it may be overloaded.
ATTEMPT_TRANSIENT = "transient"
#: The destination refused the request for good (400, 401, 413, ...): says nothing of load.
ATTEMPT_REJECTED = "rejected"

#: Called by a sender after each attempt with its outcome (one of the ``ATTEMPT_*``
#: strings) and how long the attempt took in seconds. After a transient failure, a False
#: answer asks the sender not to retry now but to return the batch deferred.
Feedback = Callable[[str, float], bool]


@dataclass(frozen=True)
class SendResult:
    """The outcome of :meth:`Sender.send` for one batch.

    - all accepted: ``error`` is None.
    - some rejected (a partial 2xx): ``error`` is set, ``failed`` holds their indices, and
      ``response`` the server's answer; the others were accepted.
    - none accepted: ``error`` is set and ``failed`` holds every index.
    ``too_large`` is True when the destination refused the batch for its size (HTTP 413);
    the caller may split it and try the halves. ``deadline_reached`` is True when the
    caller's deadline, not the destination, ended the attempts. ``deferred`` is True when
    the caller's :data:`Feedback` asked the sender to stop retrying for now: the events of
    ``failed`` were not delivered and are the caller's to send again (``error`` says why
    the last attempt failed). ``requests`` counts attempts made in this call, ``retries``
    those of them that repeated an earlier attempt.
    """

    response: Optional[BatchResponse]
    error: Optional[SendError] = None
    failed: Tuple[int, ...] = ()
    requests: int = 0
    retries: int = 0
    too_large: bool = False
    deadline_reached: bool = False
    deferred: bool = False


def attempt_outcome(result: SendResult) -> str:
    """The ``ATTEMPT_*`` outcome that describes a whole :class:`SendResult`."""
    if result.error is None or result.response is not None:
        return ATTEMPT_OK
    if result.error.retryable and not result.too_large:
        return ATTEMPT_TRANSIENT
    return ATTEMPT_REJECTED


class Sender(abc.ABC):
    """Delivers one batch of encoded events somewhere, retrying as its destination needs.

    ``send`` is called by one thread at a time per batch but may be called from several
    threads at once for different batches; implementations must be thread-safe. It must
    return by ``deadline`` (give up, don't sleep past it) and must never raise: every
    failure is described by the returned :class:`SendResult`.

    A sender that retries internally should also override :meth:`send_attempts`, so that
    its caller hears each attempt; the default reports the whole call as one attempt.
    """

    #: Largest number of events per :meth:`send` call.
    max_batch_events: int = MAX_BATCH_EVENTS
    #: Largest request body (``{"batch":[...]}``) in bytes per :meth:`send` call.
    max_batch_bytes: int = MAX_REQUEST_BYTES

    @abc.abstractmethod
    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """Deliver ``events`` (encoded JSON, already within the limits above). Blocks."""

    def send_attempts(
        self,
        events: Sequence[bytes],
        deadline: Deadline,
        *,
        feedback: Optional[Feedback] = None,
        attempts_made: int = 0,
    ) -> SendResult:
        """:meth:`send`, telling ``feedback`` about each attempt.

        ``attempts_made``: attempts this batch already had in earlier, deferred calls (a
        sender that counts attempts counts them against its limit). Blocks; never raises.
        This default reports the whole :meth:`send` call as one attempt and never defers.
        """
        started = time.monotonic()
        result = self.send(events, deadline)
        if feedback is not None:
            try:
                feedback(attempt_outcome(result), time.monotonic() - started)
            except Exception:
                pass
        return result

    def prepare(self) -> None:
        """Load what sending needs (the HTTP library, say) now, on the calling thread, so
        that the first send does not. Blocks briefly (imports); idempotent; never raises
        for a send-time problem. This default does nothing."""

    def after_fork(self) -> None:
        """Called in a forked child before first use: drop inherited connections."""

    def close(self) -> None:
        """Release connections. Idempotent."""
