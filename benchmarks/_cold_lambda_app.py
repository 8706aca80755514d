"""The Lambda function ``cold_start.py`` cold-starts on the real awslambdaric runtime.

``BENCH_COLD_MODE`` picks what the module is (each as its users would write it: the
client at module level, built during Init; one track per invocation):

- ``none``: no SDK at all (the runtime's own cold start, for scale);
- ``klime``: ``@klime_lambda`` (invocation mode: sent before the handler returns);
- ``klime-after``: ``@klime_lambda(after_response=True)`` (sent after the response, by an
  internal extension registered during Init);
- ``klime-1.1``: Klime's previous SDK, ``klime`` 1.1.0 (``KlimeClient``), with
  ``client.flush()`` before returning, as its users must in a Lambda.

``BENCH_COLD_URL`` is the collector. The handler returns the mode and the klime version
that ran, so that the harness can check it cold-started the SDK it meant to.
"""

import os

MODE = os.environ["BENCH_COLD_MODE"]
URL = os.environ["BENCH_COLD_URL"]
WRITE_KEY = "bench-write-key"

if MODE == "none":

    def handler(event, context):
        return {"mode": MODE, "version": None}

elif MODE == "klime-1.1":
    import klime
    from klime import KlimeClient

    client = KlimeClient(WRITE_KEY, endpoint=URL)

    def handler(event, context):
        client.track("Cold Start", {"plan": "pro"}, user_id="user_1")
        client.flush()
        return {"mode": MODE, "version": klime.__version__}

elif MODE in ("klime", "klime-after"):
    import klime
    from klime import klime_lambda

    client = klime.Client(WRITE_KEY, endpoint=URL)

    @klime_lambda(client=client, after_response=MODE == "klime-after")
    def handler(event, context):
        client.track("Cold Start", {"plan": "pro"}, user_id="user_1")
        return {"mode": MODE, "version": klime.__version__}

else:
    raise RuntimeError(f"unknown BENCH_COLD_MODE {MODE!r}")
