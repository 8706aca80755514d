"""Flask: a klime client per application, configured from ``app.config``.

::

    from flask import Flask
    from klime.integrations.flask import get_client, init_app

    def create_app():
        app = Flask(__name__)
        app.config.from_prefixed_env()        # FLASK_KLIME_FLUSH_INTERVAL=500 -> KLIME_FLUSH_INTERVAL
        init_app(app)                         # the client, from app.config and the environment
        ...
        return app

    @bp.post("/signup")
    def signup():
        get_client().track("Signup", user_id=...)   # the current app's client

``init_app`` builds a :class:`~klime.Client` from the app's ``KLIME_*`` configuration keys
(``KLIME_WRITE_KEY``, ``KLIME_ENDPOINT``, ``KLIME_FLUSH_INTERVAL``... one per keyword of
``Client``; what is not set falls back to the environment and the defaults) or takes the
client you pass, stores it in ``app.extensions["klime"]``, and can flush it after every
response has been sent (``KLIME_FLUSH_AFTER_REQUEST``), for platforms that may freeze or
kill the process between requests.

This module does not import Flask (``get_client()`` without an app imports
``flask.current_app``); ``import klime`` never imports this module.

An integration (top layer). May import: the face (``Client``), process life
(``_lifecycle.flush_quietly``), the model and the standard library; Flask only for type
checking and inside :func:`get_client`.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional

from .. import _lifecycle
from .._client import Client
from .._logging import log
from ..errors import ConfigurationError

if TYPE_CHECKING:
    from flask import Flask
    from flask.wrappers import Response

__all__ = ["DEFAULT_FLUSH_TIMEOUT", "EXTENSION_KEY", "client_options", "get_client", "init_app"]

#: Where the client is kept: ``app.extensions[EXTENSION_KEY]``.
EXTENSION_KEY = "klime"
#: Seconds each after-request flush may take, unless ``flush_timeout``/``KLIME_FLUSH_TIMEOUT``:
#: the one default of every integration, :data:`klime._lifecycle.DEFAULT_FLUSH_TIMEOUT`.
DEFAULT_FLUSH_TIMEOUT = _lifecycle.DEFAULT_FLUSH_TIMEOUT

_PREFIX = "KLIME_"
#: Configuration keys read by :func:`init_app` itself (not passed to the Client).
_OWN_KEYS = frozenset({"KLIME_FLUSH_AFTER_REQUEST", "KLIME_FLUSH_TIMEOUT"})


def _client_keywords() -> Dict[str, str]:
    """``KLIME_<NAME>`` -> ``name`` for every keyword argument of :class:`Client`."""
    parameters = inspect.signature(Client.__init__).parameters
    return {_PREFIX + name.upper(): name for name in parameters if name != "self"}


def client_options(config: Mapping[str, Any]) -> Dict[str, Any]:
    """The :class:`~klime.Client` keyword arguments held in a Flask-style ``config``.

    Keys are ``KLIME_`` + the option in capitals (``KLIME_MAX_BATCH_SIZE`` ->
    ``max_batch_size``); a key set to None is left out (the Client's own fallback applies).
    An unknown ``KLIME_*`` key (a typo) is logged once as a warning. Pure, thread-safe.
    """
    keywords = _client_keywords()
    options: Dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str) or not key.startswith(_PREFIX) or key in _OWN_KEYS:
            continue
        name = keywords.get(key)
        if name is None:
            log.warning_once(f"flask-config-{key}", "klime: ignoring unknown Flask configuration key %s", key)
            continue
        if value is not None:
            options[name] = value
    return options


def _checked_flush_timeout(value: Any) -> float:
    """``flush_timeout`` as positive seconds, else ConfigurationError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"flush_timeout must be a number of seconds, not {type(value).__name__}")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigurationError("flush_timeout must be a positive number of seconds")
    return seconds


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _checked_flag(value: Any) -> bool:
    """``KLIME_FLUSH_AFTER_REQUEST`` as a bool (true/false, yes/no, on/off, 1/0), else
    ConfigurationError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    if isinstance(value, int):
        return value != 0
    raise ConfigurationError(f"KLIME_FLUSH_AFTER_REQUEST must be true or false, not {value!r}")


def _after_request_hook(client: Client, timeout: float) -> Callable[[Response], Response]:
    """The ``after_request`` function that flushes ``client`` once the response is closed."""

    def klime_flush_after_response(response: Response) -> Response:
        # Runs when the WSGI server closes the response, i.e. after the body was sent:
        # the visitor does not wait for Klime; the worker does, up to ``timeout``.
        response.call_on_close(
            lambda: _lifecycle.flush_quietly(
                client, timeout, after="a Flask response", unsent_warning_key="flask-after-request-unsent"
            )
        )
        return response

    return klime_flush_after_response


def init_app(
    app: Flask,
    client: Optional[Client] = None,
    *,
    flush_after_request: Optional[bool] = None,
    flush_timeout: Optional[float] = None,
) -> Client:
    """Give ``app`` a klime client and return it.

    ``client``: the client to use; by default one is built from ``app.config``'s
    ``KLIME_*`` keys (see :func:`client_options`), so each app made by your factory gets
    its own (a test that builds the app inside ``klime_events`` gets a capturing one).
    ``flush_after_request`` (default ``app.config["KLIME_FLUSH_AFTER_REQUEST"]``, else
    False): flush the client once each response has been sent, waiting up to
    ``flush_timeout`` seconds (default ``KLIME_FLUSH_TIMEOUT``, else 2). Needed only where the
    process may be frozen or killed between requests; elsewhere the background thread and
    the exit hook deliver everything.

    Call it once per app, at set-up (not thread-safe against concurrent calls for the same
    app); raises :class:`~klime.ConfigurationError` on a bad option or a second call.
    Does not block.
    """
    if EXTENSION_KEY in app.extensions:
        raise ConfigurationError("klime is already set up on this Flask app (init_app called twice)")
    if client is not None and not isinstance(client, Client):
        raise ConfigurationError(f"client must be a klime.Client, not {type(client).__name__}")
    if flush_after_request is None:
        flush_after_request = _checked_flag(app.config.get("KLIME_FLUSH_AFTER_REQUEST", False))
    if flush_timeout is None:
        flush_timeout = app.config.get("KLIME_FLUSH_TIMEOUT", DEFAULT_FLUSH_TIMEOUT)
    timeout = _checked_flush_timeout(flush_timeout)
    if client is None:  # last: nothing is built when an option above is wrong
        client = Client(**client_options(app.config))
    app.extensions[EXTENSION_KEY] = client
    if flush_after_request:
        app.after_request(_after_request_hook(client, timeout))
    return client


def get_client(app: Optional[Flask] = None) -> Client:
    """The client :func:`init_app` gave ``app`` (default: the current app, inside a request
    or an app context). Raises :class:`~klime.ConfigurationError` when there is none.
    Non-blocking, thread-safe."""
    if app is None:
        from flask import current_app

        app = current_app
    client = app.extensions.get(EXTENSION_KEY)
    if not isinstance(client, Client):
        raise ConfigurationError(
            "klime is not set up on this Flask app: call klime.integrations.flask.init_app(app)"
        )
    return client
