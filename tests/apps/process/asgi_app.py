"""An ASGI app for the ASGI middleware test, served by uvicorn.

``GET /track?n=K`` tracks K events (ledger first, see ``mp_jobs``) and answers the tags;
the app is wrapped in ``KlimeASGIMiddleware``, with ``flush=True`` unless
``KLIME_TEST_ASGI_FLUSH=0`` (then only the lifespan shutdown flushes).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from apps.process import mp_jobs
from klime.integrations.asgi import KlimeASGIMiddleware


async def app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
    tags = mp_jobs.produce("request", int(query.get("n", "1")))
    body = json.dumps({"tags": tags}).encode()
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


application = KlimeASGIMiddleware(app, flush=os.environ.get("KLIME_TEST_ASGI_FLUSH", "1") == "1")
