"""One benchmark run of one SDK, in a fresh process started by ``run.py``.

    python benchmarks/_worker.py MODE SDK '<json spec>'

MODE is ``run`` (the workload), ``import`` (time the import only) or ``floor`` (what the
cheapest conceivable call costs; SDK is ignored). SDK ``klime-1.1`` is Klime's previous
SDK (``klime`` 1.1.0 from PyPI, ``KlimeClient``): ``run.py`` starts that worker with the
interpreter of its own venv (``_venvs.py``), since it has this project's import name.
The spec holds the SDK's options, the
collector URL, the number of events and the file to write the result to (JSON). Only
``sys`` and ``time`` are imported before the SDK, so its import time is measured in a
process that has loaded nothing it might share.
"""

from __future__ import annotations

import os  # already loaded by the interpreter's startup: costs no SDK anything
import sys
import time

WRITE_KEY = "bench-write-key"


def _import_sdk(sdk: str) -> float:
    """Import the SDK as its users do; return the seconds it took."""
    start = time.perf_counter()
    if sdk == "klime":
        import klime  # noqa: F401
    elif sdk == "klime-1.1":
        from klime import KlimeClient  # noqa: F401
    elif sdk == "segment":
        import segment.analytics  # noqa: F401
    elif sdk == "posthog":
        import posthog  # noqa: F401
    else:
        raise SystemExit(f"unknown sdk {sdk!r}")
    return time.perf_counter() - start


def main() -> None:
    mode, sdk, spec_text = sys.argv[1:4]
    import_s = None if mode == "floor" else _import_sdk(sdk)
    # Everything else only after the SDK's import has been timed.
    import json

    spec = json.loads(spec_text)
    spec["sdk"] = sdk
    if mode == "import":
        result: dict = {"import_s": import_s}
    elif mode == "floor":
        result = _floor(spec)
    else:
        result = _run(spec, import_s)
    with open(spec["out"], "w", encoding="utf-8") as fh:
        json.dump(result, fh)


def _rss_kib() -> int:
    """Current resident set size (Linux /proc), KiB; 0 where unavailable."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            pages = int(fh.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


def _percentiles(lat: object) -> dict:
    values = sorted(lat)  # type: ignore[call-overload]
    n = len(values)
    if not n:
        return {}

    def rank(q: float) -> float:
        # nearest-rank: the smallest value with at least q of the samples at or below it
        k = max(0, min(n - 1, -(-round(q * 10000) * n // 10000) - 1))
        return values[k] / 1000.0

    return {
        "p50_us": rank(0.50),
        "p90_us": rank(0.90),
        "p99_us": rank(0.99),
        "p999_us": rank(0.999),
        "max_us": values[-1] / 1000.0,
        "mean_us": sum(values) / n / 1000.0,
    }


def _make_client(spec: dict, errors: list) -> tuple:
    """(client, track(i-th event), flush) for the spec's SDK and options."""
    sdk = spec["sdk"]
    url = str(spec["url"])
    opts = dict(spec.get("options") or {})
    if sdk == "klime":
        import klime

        if opts.get("spool") == "<fresh>":  # run.py's FRESH_SPOOL: a new directory per run
            import tempfile

            opts["spool"] = tempfile.mkdtemp(prefix="klime-bench-spool-")

        def on_error_k(error: object, events: list) -> None:
            errors[0] += len(events)

        client = klime.Client(WRITE_KEY, endpoint=url, on_error=on_error_k, **opts)

        def flush() -> None:
            client.flush(timeout=300)

        return client, client.track, flush
    if sdk == "klime-1.1":
        from klime import KlimeClient

        def on_error_11(error: object, batch: list) -> None:
            errors[0] += len(batch)

        old = KlimeClient(WRITE_KEY, endpoint=url, on_error=on_error_11, **opts)
        return old, old.track, old.flush
    if sdk == "segment":
        from segment.analytics.client import Client

        def on_error_s(error: object, batch: list) -> None:
            errors[0] += len(batch)

        seg = Client(WRITE_KEY, host=url, on_error=on_error_s, **opts)
        return seg, seg.track, seg.flush
    if sdk == "posthog":
        from posthog import Posthog

        def on_error_p(error: object, batch: list) -> None:
            errors[0] += len(batch)

        ph = Posthog(WRITE_KEY, host=url, on_error=on_error_p, **opts)

        def flush_p() -> None:
            ph.flush(timeout_seconds=300)

        return ph, ph.capture, flush_p
    raise SystemExit(f"unknown sdk {sdk!r}")


def _run(spec: dict, import_s: float | None) -> dict:
    import array
    import gc
    import resource
    import threading

    sys.path.insert(0, str(spec["bench_dir"]))
    import _workload

    n = int(spec["events"])
    rss_after_import = _rss_kib()
    errors = [0]
    t0 = time.perf_counter()
    client, track, flush = _make_client(spec, errors)
    construct_s = time.perf_counter() - t0

    lat = array.array("q", bytes(8 * n))  # preallocated: no allocation in the timed loop
    users = _workload.users()
    make = _workload.properties
    event = _workload.EVENT
    pc = time.perf_counter_ns
    gc.collect()
    rss_base = _rss_kib()
    maxrss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sdk = spec["sdk"]

    first_ns = time.monotonic_ns()
    if sdk in ("klime", "klime-1.1"):  # the same call: track(event, properties, user_id=...)
        for i in range(n):
            props = make(i)
            uid = users[i % 1000]
            t = pc()
            track(event, props, user_id=uid)
            lat[i] = pc() - t
    elif sdk == "segment":
        for i in range(n):
            props = make(i)
            uid = users[i % 1000]
            t = pc()
            track(user_id=uid, event=event, properties=props)
            lat[i] = pc() - t
    else:
        for i in range(n):
            props = make(i)
            uid = users[i % 1000]
            t = pc()
            track(event, distinct_id=uid, properties=props)
            lat[i] = pc() - t
    calls_done_ns = time.monotonic_ns()
    threads_running = threading.active_count()
    flush()
    flushed_ns = time.monotonic_ns()
    client.shutdown()
    shutdown_ns = time.monotonic_ns()
    maxrss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sdk_stats = None
    if sdk == "klime":
        sdk_stats = client.stats()
    sdk_version = None
    if sdk in ("klime", "klime-1.1"):  # which klime ran: run.py checks it
        import klime

        sdk_version = getattr(klime, "__version__", None)

    result: dict = {
        "import_s": import_s,
        "construct_s": construct_s,
        "events": n,
        "first_ns": first_ns,
        "calls_done_ns": calls_done_ns,
        "flushed_ns": flushed_ns,
        "shutdown_ns": shutdown_ns,
        "rss_after_import_kib": rss_after_import,
        "rss_base_kib": rss_base,
        "maxrss_base_kib": maxrss_base,
        "maxrss_end_kib": maxrss_end,
        "rss_growth_kib": maxrss_end - (rss_base or maxrss_base),
        "on_error_events": errors[0],
        "threads_during_calls": threads_running,
        "sdk_stats": sdk_stats,
        "sdk_version": sdk_version,
        "pid": os.getpid(),
    }
    result.update(_percentiles(lat))
    return result


def _floor(spec: dict) -> dict:
    """The floor of a call: build the event dict and append it to a deque. Also, for scale,
    one ``json.dumps`` of such an event."""
    import array
    import collections
    import json

    sys.path.insert(0, str(spec["bench_dir"]))
    import _workload

    n = int(spec["events"])
    users = _workload.users()
    make = _workload.properties
    event = _workload.EVENT
    pc = time.perf_counter_ns
    queue: collections.deque = collections.deque()
    append = queue.append
    lat = array.array("q", bytes(8 * n))
    for i in range(n):
        props = make(i)
        uid = users[i % 1000]
        t = pc()
        append({"type": "track", "event": event, "userId": uid, "properties": props})
        lat[i] = pc() - t
    floor = _percentiles(lat)
    dumps = json.dumps
    for i in range(n):
        ev = queue[i]
        t = pc()
        dumps(ev)
        lat[i] = pc() - t
    return {"floor": floor, "json_dumps": _percentiles(lat)}


if __name__ == "__main__":
    main()
