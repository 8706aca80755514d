"""The Sender interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .._config import MAX_BATCH_EVENTS, MAX_REQUEST_BYTES
from .._deadline import Deadline
from .._models import BatchResponse
from ..errors import SendError

__all__ = ["Sender", "SendResult"]


@dataclass(frozen=True)
class SendResult:
    """The outcome of :meth:`Sender.send` for one batch.

    - all accepted: ``error`` is None.
    - some rejected (a partial 2xx): ``error`` is set, ``failed`` holds their indices, and
      ``response`` the server's answer; the others were accepted.
    - none accepted: ``error`` is set and ``failed`` holds every index.
    ``too_large`` is True when the destination refused the batch for its size (HTTP 413);
    the caller may split it and try the halves. ``deadline_reached`` is True when the
    caller's deadline, not the destination, ended the attempts. ``requests`` counts
    attempts made, ``retries`` those after the first.
    """

    response: Optional[BatchResponse]
    error: Optional[SendError] = None
    failed: Tuple[int, ...] = ()
    requests: int = 0
    retries: int = 0
    too_large: bool = False
    deadline_reached: bool = False


class Sender(abc.ABC):
    """Delivers one batch of encoded events somewhere, retrying as its destination needs.

    ``send`` is called by one thread at a time per batch but may be called from several
    threads at once for different batches; implementations must be thread-safe. It must
    return by ``deadline`` (give up, don't sleep past it) and must never raise: every
    failure is described by the returned :class:`SendResult`.
    """

    #: Largest number of events per :meth:`send` call.
    max_batch_events: int = MAX_BATCH_EVENTS
    #: Largest request body (``{"batch":[...]}``) in bytes per :meth:`send` call.
    max_batch_bytes: int = MAX_REQUEST_BYTES

    @abc.abstractmethod
    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """Deliver ``events`` (encoded JSON, already within the limits above). Blocks."""

    def after_fork(self) -> None:
        """Called in a forked child before first use: drop inherited connections."""

    def close(self) -> None:
        """Release connections. Idempotent."""
