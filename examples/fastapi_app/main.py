"""The klime FastAPI example: the client lives in the app's lifespan.

    uvicorn main:app --port 8000

The client is created when the server starts the app and shut down (flushed) when the
server stops it. Under uvicorn that is the moment that counts: since uvicorn 0.29, a
SIGTERM ends the process by re-raising the signal once the app is shut down, so exit hooks
(``atexit``) never run there.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Annotated, AsyncIterator, Dict

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel

import klime


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.klime = klime.Client()  # KLIME_WRITE_KEY / KLIME_ENDPOINT from the environment
    try:
        yield
    finally:
        # Flushes what is queued, in a worker thread: the event loop is never blocked.
        await app.state.klime.ashutdown(timeout=5)


app = FastAPI(lifespan=lifespan)


def get_klime(request: Request) -> klime.Client:
    client: klime.Client = request.app.state.klime
    return client


Klime = Annotated[klime.Client, Depends(get_klime)]


class Signup(BaseModel):
    user_id: str
    plan: str = "free"


@app.post("/signup")
async def signup(body: Signup, client: Klime) -> Dict[str, bool]:
    # track/identify return in microseconds, without I/O: call them straight from a coroutine.
    client.identify(body.user_id, {"plan": body.plan})
    client.track("Signup", {"plan": body.plan}, user_id=body.user_id)
    return {"ok": True}


@app.get("/upgrade")
async def upgrade(user_id: str, client: Klime) -> Dict[str, int]:
    # Wait for Klime's answer without blocking the event loop.
    response = await client.atrack_sync("Plan Upgraded", {"plan": "pro"}, user_id=user_id, timeout=5)
    return {"accepted": response.accepted}
