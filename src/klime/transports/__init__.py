"""Transports decide WHEN events go. See :class:`~klime.transports.base.Transport`.

============  =====================================================================
background    queue + sender threads; the default outside serverless
spool         background, with a durable queue on disk (``Client(spool=DIR)``)
blocking      send on the caller's thread, now; behind the ``*_sync`` methods
invocation    buffer, no thread; flushed before a serverless handler returns
memory        keep events in a list, send nothing; for tests
============  =====================================================================

How a Client picks one (by name, from the environment, or a test's override) is private:
:mod:`klime.transports._choice`.
"""

from __future__ import annotations

from .background import BackgroundTransport
from .base import Transport
from .blocking import BlockingTransport
from .invocation import InvocationTransport
from .memory import MemoryTransport
from .spooled import SpoolTransport

__all__ = [
    "Transport",
    "BackgroundTransport",
    "BlockingTransport",
    "InvocationTransport",
    "MemoryTransport",
    "SpoolTransport",
]
