"""klime 1.x's ``klime.client`` module, kept so that its imports run unchanged::

    from klime.client import KlimeClient, DEFAULT_ENDPOINT, MAX_BATCH_SIZE

:class:`KlimeClient` is :class:`klime.Client` (one class, two names). The constants carry
klime 1.x's names and values (milliseconds and bytes, as there).

Note that the *attribute* ``klime.client`` is the default client behind ``klime.track()``
and friends (``None`` until one is set or created), as klime 2 documents: reach this
module with ``from klime.client import ...`` or ``import klime.client as ...``, not as
``klime.client.KlimeClient`` after ``import klime``.
"""

from __future__ import annotations

from . import _config
from ._client import Client
from ._models import BatchResponse
from ._version import __version__
from ._wire_event import Event, EventContext, EventType, LibraryInfo
from .errors import SendError
from .types import ValidationError

#: klime 1.x's name for :class:`klime.Client`: the same class.
KlimeClient = Client

DEFAULT_ENDPOINT = _config.DEFAULT_ENDPOINT
DEFAULT_FLUSH_INTERVAL = _config.DEFAULT_FLUSH_INTERVAL_MS  # milliseconds
DEFAULT_MAX_BATCH_SIZE = _config.DEFAULT_MAX_BATCH_SIZE
DEFAULT_MAX_QUEUE_SIZE = _config.DEFAULT_MAX_QUEUE_SIZE
DEFAULT_RETRY_MAX_ATTEMPTS = _config.DEFAULT_RETRY_MAX_ATTEMPTS
DEFAULT_RETRY_INITIAL_DELAY = _config.DEFAULT_RETRY_INITIAL_DELAY_MS  # milliseconds
MAX_BATCH_SIZE = _config.MAX_BATCH_EVENTS
MAX_EVENT_SIZE_BYTES = _config.MAX_EVENT_BYTES
MAX_BATCH_SIZE_BYTES = _config.MAX_REQUEST_BYTES
SDK_VERSION = __version__

__all__ = [
    "KlimeClient",
    "BatchResponse",
    "Event",
    "EventContext",
    "EventType",
    "LibraryInfo",
    "SendError",
    "ValidationError",
    "DEFAULT_ENDPOINT",
    "DEFAULT_FLUSH_INTERVAL",
    "DEFAULT_MAX_BATCH_SIZE",
    "DEFAULT_MAX_QUEUE_SIZE",
    "DEFAULT_RETRY_MAX_ATTEMPTS",
    "DEFAULT_RETRY_INITIAL_DELAY",
    "MAX_BATCH_SIZE",
    "MAX_EVENT_SIZE_BYTES",
    "MAX_BATCH_SIZE_BYTES",
    "SDK_VERSION",
]
