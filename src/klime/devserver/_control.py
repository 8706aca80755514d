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

Imports: the standard library and the devserver's own :mod:`._faults`, :mod:`._record` and
:mod:`._answers`; the collector is reached through the :class:`Controlled` protocol only.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Protocol
from urllib.parse import parse_qs

from ._answers import Refusal
from ._faults import Fault, fault_from_json
from ._record import RecordedRequest, redacted

__all__ = ["PREFIX", "Controlled", "control"]

PREFIX = "/_klime/"
_GET_ROUTES = ("events", "requests", "health")
_POST_ROUTES = ("reset", "mode", "respond", "random")
_MAX_WAIT_S = 60.0


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
