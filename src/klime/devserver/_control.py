"""The control endpoints under ``/_klime/``: the :class:`Collector` calls, over HTTP.

For a collector in another process (``python -m klime.devserver``, a test's child server)::

    GET  /_klime/health                 {"status": "ok"}
    GET  /_klime/events?min=N&timeout=S  the accepted events (waits up to S s for N of them)
    GET  /_klime/requests               one summary per recorded request, write key redacted
    POST /_klime/reset                  Collector.reset()
    POST /_klime/mode      FAULT|null   Collector.set_mode(...)
    POST /_klime/respond   [FAULT,...]  Collector.respond(...)
    POST /_klime/random    {"seed": int, "rates": {spec: probability}}

A FAULT is a spec string (``"503"``, ``"slow:0.5"``) or the JSON form of
:meth:`Fault.to_dict`. Control requests are not recorded.

Who may call them (:func:`check_access`, before the body is read): a request addressed to
this server by name (``Host: 127.0.0.1:PORT``, ``localhost:PORT``, ``[::1]:PORT`` or the
bound address; any IP address when bound to all interfaces), so a web page cannot reach
them through DNS rebinding; not a cross-origin browser request (an ``Origin`` other than
the server's own, or ``Sec-Fetch-Site`` other than ``same-origin``/``none``), so a page
cannot fire them blind (CSRF); and, when the server has a write key, only with
``Authorization: Bearer <write key>``. Refused: 403 (Host, Origin) or 401 (key), and the
connection is closed.

Imports: the standard library and the devserver's own :mod:`._faults`, :mod:`._record` and
:mod:`._answers`; the collector is reached through the :class:`Controlled` protocol only.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Callable, Mapping, Protocol
from urllib.parse import parse_qs

from ._answers import Refusal
from ._faults import Fault, fault_from_json
from ._record import RecordedRequest, redacted

__all__ = ["PREFIX", "Controlled", "check_access", "control"]

PREFIX = "/_klime/"
_GET_ROUTES = ("events", "requests", "health")
_POST_ROUTES = ("reset", "mode", "respond", "random")
_MAX_WAIT_S = 60.0


_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
_ALL_INTERFACES = frozenset({"", "0.0.0.0", "::"})
_SAME_SITE_FETCHES = frozenset({"same-origin", "none"})


def check_access(
    headers: Callable[[str], str | None], *, bound_host: str, port: int, write_key: str | None
) -> None:
    """Raise :class:`Refusal` (403 or 401, closing the connection) unless a control request
    may go on, for a server bound to ``bound_host:port`` with ``write_key``; ``headers(name)``
    is the request's header ``name`` or None.

    See the module's docstring for the rules. Never blocks; thread-safe (pure).
    """
    if not _host_allowed(headers("Host"), bound_host, port):
        raise Refusal(
            403,
            f"control endpoints answer only requests addressed to 127.0.0.1:{port} or "
            f"localhost:{port} (Host header)",
            close=True,
        )
    origin = headers("Origin")
    if origin is not None and not _own_origin(origin, bound_host, port):
        raise Refusal(403, "cross-origin requests to the control endpoints are refused", close=True)
    fetch_site = headers("Sec-Fetch-Site")
    if fetch_site is not None and fetch_site.strip().lower() not in _SAME_SITE_FETCHES:
        raise Refusal(403, "cross-site requests to the control endpoints are refused", close=True)
    if write_key is not None:
        scheme, _, token = (headers("Authorization") or "").strip().partition(" ")
        good = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8", "surrogateescape"), write_key.encode("utf-8", "surrogateescape")
        )
        if not good:
            raise Refusal(
                401, "control endpoints need Authorization: Bearer <the server's write key>", close=True
            )


def _split_host(value: str) -> tuple[str, int | None] | None:
    """``("name", port)`` of a Host header value (port None when absent); None if malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        digits = rest[1:]
    else:
        name, colon, digits = value.partition(":")
        if colon and not digits:
            return None
    if not name or (digits and not digits.isdigit()):
        return None
    return name, int(digits) if digits else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _host_allowed(value: str | None, bound_host: str, port: int) -> bool:
    parts = _split_host(value or "")
    if parts is None:
        return False
    name, given_port = parts
    if (given_port if given_port is not None else 80) != port:
        return False
    bound = bound_host.strip("[]").lower()
    if name in _LOOPBACK_NAMES or name == bound:
        return True
    # Bound to every interface: reached by any address, but a name could be rebound.
    return bound in _ALL_INTERFACES and _is_ip(name)


def _own_origin(origin: str, bound_host: str, port: int) -> bool:
    scheme, sep, host = origin.strip().partition("://")
    if not sep or scheme.lower() != "http" or "/" in host:
        return False
    return _host_allowed(host, bound_host, port)


class Controlled(Protocol):
    """What the control endpoints call: the public methods of :class:`Collector`."""

    def events(self) -> list[dict[str, Any]]: ...
    def requests(self) -> list[RecordedRequest]: ...
    def wait_for_events(self, n: int, timeout: float) -> bool: ...
    def reset(self) -> None: ...
    def set_mode(self, fault: Fault | None) -> None: ...
    def respond(self, *faults: Fault) -> None: ...
    def set_random_faults(self, seed: int | None, rates: Mapping[str, float]) -> None: ...


def control(target: Controlled, method: str, target_path: str, body: bytes) -> bytes:
    """Carry out one control request; return the JSON body of its 200 answer.

    ``target_path`` is the request target (query included). Raises :class:`Refusal` (400,
    404, 405). Blocks only for ``GET /_klime/events?min=N&timeout=S`` (at most 60 s).
    """
    path, _, query = target_path.partition("?")
    route = path[len(PREFIX) :].rstrip("/")
    if method == "GET" and route in _GET_ROUTES:
        result = _get(target, route, query)
    elif method == "POST" and route in _POST_ROUTES:
        result = _post(target, route, body)
    elif route in _GET_ROUTES or route in _POST_ROUTES:
        raise Refusal(405, f"{method} not allowed on {path}")
    else:
        raise Refusal(404, f"no such control endpoint: {path}")
    return json.dumps(result, default=str).encode("utf-8")


def _get(target: Controlled, route: str, query: str) -> Any:
    if route == "health":
        return {"status": "ok"}
    if route == "requests":
        return [redacted(r) for r in target.requests()]
    params = parse_qs(query)
    try:
        wait_for = int(params.get("min", ["0"])[0])
        timeout = min(float(params.get("timeout", ["0"])[0]), _MAX_WAIT_S)
    except ValueError:
        raise Refusal(400, "min must be an int and timeout a number") from None
    if wait_for > 0 and timeout > 0:
        target.wait_for_events(wait_for, timeout)
    return target.events()


def _post(target: Controlled, route: str, body: bytes) -> Any:
    try:
        data = json.loads(body) if body.strip() else None
        if route == "reset":
            target.reset()
        elif route == "mode":
            target.set_mode(None if data is None else fault_from_json(data))
        elif route == "respond":
            if not isinstance(data, list):
                raise ValueError("expected a JSON list of faults")
            target.respond(*[fault_from_json(item) for item in data])
        else:  # random
            if not isinstance(data, dict) or not isinstance(data.get("rates"), dict):
                raise ValueError('expected {"seed": int, "rates": {kind: probability}}')
            seed = data.get("seed")
            if seed is not None and not isinstance(seed, int):
                raise ValueError("seed must be an int")
            target.set_random_faults(seed, data["rates"])
    except (ValueError, TypeError) as exc:
        raise Refusal(400, str(exc)) from None
    return {"status": "ok"}
