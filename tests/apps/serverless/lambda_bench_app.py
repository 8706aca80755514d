"""The handler benchmarks/serverless_latency.py runs on the real awslambdaric (and
tests/test_integrations_lambda.py checks the harness with it).

KLIME_BENCH_MODE picks what the module is:

- ``none``: no klime at all (not even imported) — the baseline;
- ``before``: ``@klime_lambda`` (events sent before the handler returns);
- ``after``: ``@klime_lambda(after_response=True)`` (klime registers as an internal
  extension during Init and sends after the response).

An event is ``{"n": int}``: the handler builds ``n`` event property dicts and, with klime,
tracks them (max_batch_size KLIME_BENCH_BATCH, default 20), then returns the client's
``stats()`` (taken before the flush) so that the harness can check delivery.
"""

import os

MODE = os.environ.get("KLIME_BENCH_MODE", "none")
BATCH = int(os.environ.get("KLIME_BENCH_BATCH", "20"))

if MODE == "none":

    def handler(event, context):
        for i in range(int(event.get("n", 0))):
            {"i": i, "plan": "pro"}  # noqa: B018 - the same work, minus klime
        return {"mode": MODE, "stats": None}

else:
    import klime
    from klime import klime_lambda

    CLIENT = klime.Client(max_batch_size=BATCH, max_queue_size=100_000, retry_initial_delay=10)

    def _body(event, context):
        for i in range(int(event.get("n", 0))):
            CLIENT.track("Benchmark Event", {"i": i, "plan": "pro"}, user_id=f"user-{i}")
        return {"mode": MODE, "stats": CLIENT.stats()}

    handler = klime_lambda(client=CLIENT, flush_timeout=10, after_response=MODE == "after")(_body)
