"""The result and event types of klime, under the names klime 1.x gave them.

Code written for klime 1.x imports from here unchanged::

    from klime.types import BatchResponse, Event, EventType, SendError, ValidationError

``ValidationError`` in this module is klime 1.x's name for one event the server rejected
inside an accepted request (``index``, ``message``, ``code``): it is
:class:`klime.EventError`. The exception for bad input to ``track``/``identify``/``group``
is :class:`klime.ValidationError` (``klime.errors.ValidationError``), a different class.
"""

from __future__ import annotations

from ._models import BatchResponse, EventError
from ._wire_event import Event, EventContext, EventType, LibraryInfo
from .errors import SendError

#: klime 1.x's name for :class:`klime.EventError` (one rejected event of a response).
ValidationError = EventError

__all__ = [
    "BatchResponse",
    "Event",
    "EventContext",
    "EventError",
    "EventType",
    "LibraryInfo",
    "SendError",
    "ValidationError",
]
