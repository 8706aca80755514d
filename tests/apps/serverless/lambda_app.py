"""Lambda handlers run by the real awslambdaric in tests/test_integrations_lambda.py.

The clients are created at import, as users do, from the environment the test gives the
runtime: KLIME_WRITE_KEY / KLIME_ENDPOINT (the collector), KLIME_TEST_RETRY_DELAY_MS,
KLIME_TEST_MARGIN (the decorator's deadline_margin, seconds), KLIME_TEST_INIT_EVENTS (events
tracked at import, tag ``init``). No transport is named: inside
Lambda (AWS_LAMBDA_FUNCTION_NAME is set) klime picks the invocation transport itself.

An event is ``{"tag": str, "n": int, "raise": bool}``: the handler tracks ``n`` events whose
``properties.tag`` is ``tag`` (so a test can tell invocations apart), then returns (or raises).
"""

import asyncio
import os

import klime
from klime import klime_lambda

CLIENT = klime.Client(retry_initial_delay=float(os.environ.get("KLIME_TEST_RETRY_DELAY_MS", "10")))
MARGIN = float(os.environ.get("KLIME_TEST_MARGIN", "0.25"))

# Only used by background_undecorated; its thread starts on its first event.
BACKGROUND = klime.Client(transport="background", flush_interval=500)


def _track(client, event):
    tag = event.get("tag", "")
    for i in range(int(event.get("n", 0))):
        client.track("Lambda Event", {"tag": tag, "i": i}, user_id=f"user-{i}")


_track(CLIENT, {"tag": "init", "n": int(os.environ.get("KLIME_TEST_INIT_EVENTS", "0"))})


def _describe(context):
    return {
        "pid": os.getpid(),
        "client": id(CLIENT),
        "transport": CLIENT.transport.name,
        "stats": CLIENT.stats(),  # before the decorator's flush
        "remaining_ms": context.get_remaining_time_in_millis(),
    }


@klime_lambda(client=CLIENT, deadline_margin=MARGIN)
def tracked(event, context):
    _track(CLIENT, event)
    if event.get("raise"):
        raise ValueError(f"handler failed: {event.get('tag')}")
    return _describe(context)


@klime_lambda(client=CLIENT, deadline_margin=MARGIN)
async def async_tracked(event, context):
    await asyncio.sleep(0)
    _track(CLIENT, event)
    await asyncio.sleep(0)
    return _describe(context)


@klime_lambda
def bare(event, context):
    """Bare decorator: the default client (klime.track) and the module's client are flushed."""
    tag = event.get("tag", "")
    for i in range(int(event.get("n", 0))):
        klime.track("Default Client Event", {"tag": tag, "i": i}, user_id=f"user-{i}")
    _track(CLIENT, {"tag": tag + "-module", "n": event.get("n", 0)})
    return {"default_transport": klime.get_client().transport.name}


def undecorated(event, context):
    _track(CLIENT, event)
    return _describe(context)


def background_undecorated(event, context):
    """No decorator and a background thread: the freeze catches the events in its queue.
    With ``"flush": true`` the handler flushes that client itself before returning."""
    _track(BACKGROUND, event)
    if event.get("flush"):
        BACKGROUND.flush(timeout=5)
    return {"pid": os.getpid()}
