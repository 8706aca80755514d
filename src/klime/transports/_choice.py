"""How a Client gets its transport: by name (``Client(transport="background")``), chosen
from the environment (``invocation`` on serverless, ``background`` elsewhere), an instance
as given, or a factory a test installed (``klime.testing``). Private to klime.

May import: the transports, the model, ``_runtime``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Union

from ..errors import ConfigurationError
from .background import BackgroundTransport
from .base import SyncTransport, Transport
from .blocking import BlockingTransport
from .invocation import InvocationTransport
from .memory import MemoryTransport
from .spooled import SpoolTransport

__all__ = ["make_transport", "make_sync_transport", "set_transport_override", "default_transport_name"]


def _queued(cls: Any) -> Callable[..., Transport]:
    def make(**options: Any) -> Transport:
        return cls(**options)  # type: ignore[no-any-return]

    return make


def _plain(cls: Any) -> Callable[..., Transport]:
    def make(**options: Any) -> Transport:
        return cls()  # type: ignore[no-any-return]

    return make


#: Transport names accepted by ``Client(transport=...)``.
REGISTRY: Dict[str, Callable[..., Transport]] = {
    "background": _queued(BackgroundTransport),
    "invocation": _queued(InvocationTransport),
    "blocking": _plain(BlockingTransport),
    "memory": _plain(MemoryTransport),
}


def default_transport_name() -> str:
    """``invocation`` on AWS Lambda and Cloud Functions, ``background`` elsewhere."""
    from .._runtime import serverless_platform

    return "invocation" if serverless_platform() else "background"


#: When set, every Client created from now on gets its transport from this factory,
#: whatever it asked for (``klime.testing`` uses it to capture events with no network).
_override: Optional[Callable[[], Transport]] = None


def set_transport_override(factory: Optional[Callable[[], Transport]]) -> None:
    """Make every Client created from now on use ``factory()`` as its transport (None: stop)."""
    global _override
    _override = factory


def make_sync_transport(main: Transport) -> SyncTransport:
    """The transport behind a client's ``*_sync`` calls: ``main``'s own choice, else blocking."""
    own = main.sync_transport()
    return own if own is not None else BlockingTransport()


def make_transport(
    spec: Union[str, Transport, None],
    *,
    spool: Optional[Dict[str, Any]] = None,
    **options: Any,
) -> Transport:
    """A transport from a name (or None: chosen from the environment) or an instance.

    ``spool``: the spool transport's own options (``directory``, ``max_bytes``,
    ``retry_initial_delay``): the background transport then keeps its queue on disk."""
    if _override is not None:
        return _override()
    if spool is not None:
        if isinstance(spec, Transport) or spec not in (None, "background", "spool"):
            raise ConfigurationError(
                "spool= works with the background transport (the default outside serverless), "
                f"not with transport={spec!r}"
            )
        if spec is None and default_transport_name() != "background":
            raise ConfigurationError(
                "spool= is for long-running processes; on AWS Lambda and Cloud Functions the "
                "invocation transport sends everything before the handler returns"
            )
        return SpoolTransport(**spool, **options)
    if isinstance(spec, Transport):
        return spec
    if spec is None:
        spec = default_transport_name()
    if spec == "spool":
        raise ConfigurationError('transport="spool" needs spool=DIRECTORY')
    if isinstance(spec, str) and spec in REGISTRY:
        return REGISTRY[spec](**options)
    names = ", ".join(sorted(REGISTRY))
    raise ConfigurationError(f"transport must be one of {names} or a Transport instance, not {spec!r}")
