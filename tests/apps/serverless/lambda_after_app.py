"""Lambda handlers in after-response mode, run by the real awslambdaric in
tests/test_integrations_lambda.py (and by benchmarks/serverless_latency.py).

Importing this module applies ``@klime_lambda(after_response=True)``, so klime registers as
a Lambda internal extension during Init. Environment: KLIME_WRITE_KEY / KLIME_ENDPOINT,
KLIME_TEST_RETRY_DELAY_MS, KLIME_TEST_MARGIN (deadline_margin, s), KLIME_TEST_BUDGET
(flush_timeout, s), KLIME_TEST_BATCH (max_batch_size), KLIME_TEST_INIT_EVENTS (events
tracked at import, tag ``init``).

An event is ``{"tag": str, "n": int, "raise": bool}``, as in lambda_app.py.
"""

import asyncio
import os

import klime
from klime import klime_lambda

CLIENT = klime.Client(
    retry_initial_delay=float(os.environ.get("KLIME_TEST_RETRY_DELAY_MS", "10")),
    max_batch_size=int(os.environ.get("KLIME_TEST_BATCH", "20")),
    max_queue_size=10_000,
)
MARGIN = float(os.environ.get("KLIME_TEST_MARGIN", "0.25"))
BUDGET = float(os.environ.get("KLIME_TEST_BUDGET", "2"))


def _track(event):
    tag = event.get("tag", "")
    for i in range(int(event.get("n", 0))):
        CLIENT.track("Lambda Event", {"tag": tag, "i": i}, user_id=f"user-{i}")


_track({"tag": "init", "n": int(os.environ.get("KLIME_TEST_INIT_EVENTS", "0"))})


def _describe():
    return {"pid": os.getpid(), "transport": CLIENT.transport.name, "stats": CLIENT.stats()}


@klime_lambda(client=CLIENT, deadline_margin=MARGIN, flush_timeout=BUDGET, after_response=True)
def handler(event, context):
    _track(event)
    if event.get("raise"):
        raise ValueError(f"handler failed: {event.get('tag')}")
    return _describe()


@klime_lambda(client=CLIENT, deadline_margin=MARGIN, flush_timeout=BUDGET, after_response=True)
async def async_handler(event, context):
    await asyncio.sleep(0)
    _track(event)
    await asyncio.sleep(0)
    if event.get("raise"):
        raise ValueError(f"async handler failed: {event.get('tag')}")
    return _describe()


@klime_lambda(client=CLIENT, deadline_margin=MARGIN, flush_timeout=BUDGET, after_response=True)
def _decorated_helper(event, context):
    _track(event)
    return _describe()


def not_the_decorated_one(event, context):
    """Configured as the handler: a plain function calling a decorated one. klime cannot
    serve it after the response; the decorated helper flushes before it returns."""
    return _decorated_helper(event, context)


def stats(event, context):
    """Undecorated: what the client counted so far (no events tracked)."""
    return _describe()
