"""A Lambda handler decorated with ``@klime_lambda(after_response=True)`` only during its
first invocation — after Init, too late to register an extension: klime must fall back to
sending before the handler returns, with one warning. Run by the real awslambdaric in
tests/test_integrations_lambda.py (KLIME_WRITE_KEY / KLIME_ENDPOINT from the environment).
"""

import os

import klime
from klime import klime_lambda

CLIENT = klime.Client(retry_initial_delay=10)
_decorated = None


def _body(event, context):
    for i in range(int(event.get("n", 0))):
        CLIENT.track("Lambda Event", {"tag": event.get("tag", ""), "i": i}, user_id=f"user-{i}")
    return {"pid": os.getpid(), "stats": CLIENT.stats()}


def handler(event, context):
    global _decorated
    if _decorated is None:
        _decorated = klime_lambda(client=CLIENT, after_response=True)(_body)
    return _decorated(event, context)
