"""klime — the Python SDK of Klime, a customer-analytics service.

    import klime

    client = klime.Client("your-write-key")
    client.identify("user_123", {"email": "user@example.com"})
    client.track("Button Clicked", {"plan": "pro"}, user_id="user_123")

Or use the module-level functions, which act on a default client created on first use from
``KLIME_WRITE_KEY`` / ``KLIME_ENDPOINT`` (or set ``klime.client`` yourself).
"""

from __future__ import annotations

import datetime as _dt
import logging
import sys
import types as _types
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from . import _default, _lifecycle, types
from ._client import DEFAULT_SHUTDOWN_TIMEOUT, Client, KlimeClient
from ._logging import NULL_HANDLER as _NULL_HANDLER
from ._logging import set_logger as _set_logger
from ._models import BatchResponse, EventError, FlushResult
from ._settings import defaults as _defaults
from ._version import __version__
from .errors import ConfigurationError, KlimeError, SendError, ValidationError
from .senders.base import Sender, SendResult
from .transports import (
    BackgroundTransport,
    BlockingTransport,
    InvocationTransport,
    MemoryTransport,
    SpoolTransport,
    Transport,
)

if TYPE_CHECKING:
    from ._backfill import ImportResult, backfill, import_files
    from .integrations import klime_cloud_function, klime_lambda
    from .integrations.asgi import asgi_lifespan

__all__ = [
    "__version__",
    "Client",
    "KlimeClient",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "BatchResponse",
    "EventError",
    "FlushResult",
    "KlimeError",
    "ConfigurationError",
    "ValidationError",
    "SendError",
    "Transport",
    "BackgroundTransport",
    "BlockingTransport",
    "InvocationTransport",
    "MemoryTransport",
    "SpoolTransport",
    "Sender",
    "SendResult",
    "client",
    "configure",
    "get_client",
    "set_client",
    "types",
    "track",
    "identify",
    "group",
    "track_sync",
    "identify_sync",
    "group_sync",
    "flush",
    "shutdown",
    "restart",
    "backfill",
    "import_files",
    "ImportResult",
    "asgi_lifespan",
    "klime_lambda",
    "klime_cloud_function",
]

# The library convention; warnings that mean lost events still reach stderr when the app
# configured no logging (klime._logging writes that one line itself).
logging.getLogger("klime").addHandler(_NULL_HANDLER)

#: The default client used by the module-level functions; set it, or let it be created on
#: first use from the environment (``KLIME_WRITE_KEY``, ``KLIME_ENDPOINT``). It lives in
#: :mod:`klime._default` (the layers under this package ask there); this attribute reads
#: and writes it.
client: Optional[Client]


class _KlimeModule(_types.ModuleType):
    @property
    def client(self) -> Optional[Client]:
        return _default.current()

    @client.setter
    def client(self, value: Optional[Client]) -> None:
        if isinstance(value, _types.ModuleType):
            # ``import klime.client`` (klime 1.x's module) binds the submodule here; the
            # attribute stays the default client, the module is reached by its import
            return
        _default.replace(value)


sys.modules[__name__].__class__ = _KlimeModule


def _install_runtime_hooks() -> None:
    """Run by klime._lifecycle for each new client: inside uWSGI, klime's uWSGI hooks."""
    from . import _runtime

    if _runtime.uwsgi_module() is not None:
        from .integrations.uwsgi import install

        install()


_lifecycle.add_register_hook(_install_runtime_hooks)


def configure(
    *,
    logger: Any = None,
    on_error: Any = None,
    on_success: Any = None,
) -> None:
    """Set process-wide defaults: the logger klime writes to, and the callbacks used by
    clients created without their own. Thread-safe; applies to existing clients too."""
    if logger is not None:
        _set_logger(logger)
    if on_error is not None:
        if not callable(on_error):
            raise ConfigurationError("on_error must be callable")
        _defaults.on_error = on_error
    if on_success is not None:
        if not callable(on_success):
            raise ConfigurationError("on_success must be callable")
        _defaults.on_success = on_success


def get_client() -> Client:
    """The default client, created from the environment on first use. Thread-safe."""
    return _default.get_or_create()


def set_client(client: Optional[Client]) -> Optional[Client]:
    """Make ``client`` the default client (None: forget it); returns the previous one,
    which is not shut down. The same as assigning ``klime.client``. Thread-safe."""
    return _default.replace(client)


def track(
    event: str,
    properties: Optional[Mapping[str, Any]] = None,
    user_id: Union[str, int, None] = None,
    group_id: Union[str, int, None] = None,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
) -> None:
    """:meth:`Client.track` on the default client."""
    get_client().track(
        event, properties, user_id, group_id, timestamp=timestamp, message_id=message_id
    )


def identify(
    user_id: Union[str, int],
    traits: Optional[Mapping[str, Any]] = None,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
) -> None:
    """:meth:`Client.identify` on the default client."""
    get_client().identify(user_id, traits, timestamp=timestamp, message_id=message_id)


def group(
    group_id: Union[str, int],
    traits: Optional[Mapping[str, Any]] = None,
    user_id: Union[str, int, None] = None,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
) -> None:
    """:meth:`Client.group` on the default client."""
    get_client().group(group_id, traits, user_id, timestamp=timestamp, message_id=message_id)


def track_sync(
    event: str,
    properties: Optional[Mapping[str, Any]] = None,
    user_id: Union[str, int, None] = None,
    group_id: Union[str, int, None] = None,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
    timeout: Optional[float] = None,
) -> BatchResponse:
    """:meth:`Client.track_sync` on the default client."""
    return get_client().track_sync(
        event, properties, user_id, group_id, timestamp=timestamp, message_id=message_id, timeout=timeout
    )


def identify_sync(
    user_id: Union[str, int],
    traits: Optional[Mapping[str, Any]] = None,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
    timeout: Optional[float] = None,
) -> BatchResponse:
    """:meth:`Client.identify_sync` on the default client."""
    return get_client().identify_sync(
        user_id, traits, timestamp=timestamp, message_id=message_id, timeout=timeout
    )


def group_sync(
    group_id: Union[str, int],
    traits: Optional[Mapping[str, Any]] = None,
    user_id: Union[str, int, None] = None,
    *,
    timestamp: Optional[_dt.datetime] = None,
    message_id: Optional[str] = None,
    timeout: Optional[float] = None,
) -> BatchResponse:
    """:meth:`Client.group_sync` on the default client."""
    return get_client().group_sync(
        group_id, traits, user_id, timestamp=timestamp, message_id=message_id, timeout=timeout
    )


def flush(timeout: Optional[float] = None) -> FlushResult:
    """Flush the default client, if there is one. Blocks up to ``timeout`` seconds."""
    current = _default.current()
    return current.flush(timeout) if current is not None else FlushResult()


def shutdown(timeout: Optional[float] = None) -> FlushResult:
    """Shut the default client down, if there is one; see :meth:`Client.shutdown` (bounded
    by default)."""
    current = _default.current()
    return current.shutdown(timeout) if current is not None else FlushResult()


def restart() -> None:
    """Re-arm every client in this process after a fork (Ruby's ``Klime.restart!``).

    Forks are detected automatically; call this only if your server forks in a way klime
    cannot see. The child forgets events queued by its parent (the parent sends them).
    """
    from . import _lifecycle

    _lifecycle.rearm()


def __getattr__(name: str) -> Any:
    # The serverless decorators live in klime.integrations; import them only when asked.
    if name in ("klime_lambda", "klime_cloud_function"):
        from . import integrations

        return getattr(integrations, name)
    if name in ("backfill", "import_files", "ImportResult"):  # history import: loaded when used
        from . import _backfill

        return getattr(_backfill, name)
    if name == "asgi_lifespan":  # an integration too (klime.integrations.asgi)
        from .integrations.asgi import asgi_lifespan

        return asgi_lifespan
    raise AttributeError(f"module 'klime' has no attribute {name!r}")
