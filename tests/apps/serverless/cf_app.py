"""Cloud Functions run by the real functions-framework in
tests/test_integrations_cloud_functions.py (served through gunicorn, which imports this
module in its master and forks the worker afterwards).

The client is created at import from KLIME_WRITE_KEY / KLIME_ENDPOINT; KLIME_TEST_MARGIN is
the decorator's deadline_margin. Requests say what to track: ``?tag=...&n=...&raise=1`` for
HTTP functions, ``{"tag": ..., "n": ...}`` as the CloudEvent's data.
"""

import asyncio
import os

import functions_framework
import functions_framework.aio

import klime
from klime import klime_cloud_function

CLIENT = klime.Client(retry_initial_delay=10)
MARGIN = float(os.environ.get("KLIME_TEST_MARGIN", "0.25"))


def _track(tag, n):
    for i in range(int(n)):
        CLIENT.track("Function Event", {"tag": tag, "i": i}, user_id=f"user-{i}")


def _describe():
    return {"pid": os.getpid(), "transport": CLIENT.transport.name, "stats": CLIENT.stats()}


@functions_framework.http
@klime_cloud_function(client=CLIENT, deadline_margin=MARGIN)
def http_fn(request):
    _track(request.args.get("tag", ""), request.args.get("n", "0"))
    if request.args.get("raise"):
        raise ValueError(f"function failed: {request.args.get('tag')}")
    return _describe()


@functions_framework.cloud_event
@klime_cloud_function(client=CLIENT, deadline_margin=MARGIN)
def event_fn(cloud_event):
    data = cloud_event.data or {}
    _track(data.get("tag", ""), data.get("n", 0))


@functions_framework.aio.http
@klime_cloud_function(client=CLIENT, deadline_margin=MARGIN)
async def async_http_fn(request):
    await asyncio.sleep(0)
    _track(request.query_params.get("tag", ""), request.query_params.get("n", "0"))
    if request.query_params.get("raise"):
        raise ValueError(f"function failed: {request.query_params.get('tag')}")
    return _describe()
