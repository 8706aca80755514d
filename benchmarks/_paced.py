"""One run of the round-trip benchmark, in a fresh process started by ``roundtrip.py``.

    python benchmarks/_paced.py MODE SDK '<json spec>'

MODE is

- ``paced``: ``events`` calls at ``rate`` calls/s, then the SDK's normal end (klime
  ``shutdown()``; Segment ``flush()`` then ``shutdown()``; PostHog ``shutdown()``). With
  ``end_limit`` (seconds) the end runs on a daemon thread and the process leaves through
  ``os._exit`` once it returned or the limit passed, whichever is first (the 503 case,
  where a normal end would wait out every retry);
- ``burst``: ``events`` calls as fast as they go, then the SDK's normal end (as ``paced``):
  what each call costs the caller, and how long the app spends on the burst;
- ``exit``: ``events`` calls as fast as they go, then nothing: the process just ends, and
  whatever the SDK does at exit (atexit hooks) is what is measured;
- SDK ``none`` (paced only): no SDK at all, the workload's arguments are built and no call
  made: the pacer's own CPU and lateness, for scale;
- ``load``: no SDK; ``connections`` threads, each posting one pre-encoded batch after the
  other on its own keep-alive connection for ``seconds`` (what the collector can take).

Every SDK runs at its defaults: only the write key and the host are given, no callback.
SDK ``klime-1.1`` is Klime's previous SDK (``klime`` 1.1.0, ``KlimeClient``), run by
``roundtrip.py`` with the interpreter of its own venv (same import name as this project).
Nothing here configures logging or writes to stderr, so whatever reaches stderr was
printed by the SDK (or Python, for it). The result is written as JSON to ``out``.
Timestamps are ``time.monotonic_ns()`` (CLOCK_MONOTONIC: one clock for every process on
Linux, comparable with the collector's).
"""

from __future__ import annotations

import os
import sys
import time

WRITE_KEY = "bench-write-key"

#: Calls due are issued in slots of this many nanoseconds (the pacer sleeps in between).
SLOT_NS = 1_000_000


def main() -> None:
    mode, sdk, spec_text = sys.argv[1:4]
    import json

    spec = json.loads(spec_text)
    sys.path.insert(0, str(spec["bench_dir"]))
    if mode == "load":
        result = _load(spec)
    elif mode == "exit":
        result = _exit(sdk, spec)
    elif mode == "burst":
        result = _burst(sdk, spec)
    elif mode == "paced":
        result = _paced(sdk, spec)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    _write(spec["out"], result)
    if mode == "paced" and spec.get("end_limit") is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)  # the end may still be running on its thread: leave without waiting


def _write(path: str, result: dict) -> None:
    import json

    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(result, fh)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- SDKs


def _make_client(sdk: str, url: str) -> tuple:
    """(client, end) for ``sdk`` at its defaults, writing to ``url``."""
    if sdk == "klime":
        import klime

        client = klime.Client(WRITE_KEY, endpoint=url)
        return client, client.shutdown
    if sdk == "klime-1.1":  # its documented end: shutdown() sends what is queued
        from klime import KlimeClient

        old = KlimeClient(WRITE_KEY, endpoint=url)
        return old, old.shutdown
    if sdk == "segment":
        from segment.analytics.client import Client

        seg = Client(WRITE_KEY, host=url)

        def end_segment() -> None:
            seg.flush()
            seg.shutdown()

        return seg, end_segment
    if sdk == "none":  # the pacer alone: what the loop itself costs, for scale
        return None, lambda: None
    if sdk == "posthog":
        from posthog import Posthog

        ph = Posthog(WRITE_KEY, host=url)
        return ph, ph.shutdown
    raise SystemExit(f"unknown sdk {sdk!r}")


def _firer(sdk: str, client: object, lat: object) -> object:
    """``fire(i)``: make call ``i`` of the workload, store its duration (ns) in ``lat[i]``,
    return the ``perf_counter_ns()`` at which the call started. Each SDK has its own
    function so that only the SDK's call is inside the timed region."""
    import _workload

    users = _workload.users()
    make = _workload.properties
    event = _workload.EVENT
    pc = time.perf_counter_ns
    if sdk in ("klime", "klime-1.1"):  # the same call: track(event, properties, user_id=...)
        track = client.track  # type: ignore[attr-defined]

        def fire_klime(i: int) -> int:
            props = make(i)
            uid = users[i % 1000]
            t = pc()
            track(event, props, user_id=uid)
            lat[i] = pc() - t  # type: ignore[index]
            return t

        return fire_klime
    if sdk == "segment":
        track_s = client.track  # type: ignore[attr-defined]

        def fire_segment(i: int) -> int:
            props = make(i)
            uid = users[i % 1000]
            t = pc()
            track_s(user_id=uid, event=event, properties=props)
            lat[i] = pc() - t  # type: ignore[index]
            return t

        return fire_segment
    if sdk == "none":

        def fire_none(i: int) -> int:
            make(i)
            users[i % 1000]
            t = pc()
            lat[i] = pc() - t  # type: ignore[index]
            return t

        return fire_none
    capture = client.capture  # type: ignore[attr-defined]

    def fire_posthog(i: int) -> int:
        props = make(i)
        uid = users[i % 1000]
        t = pc()
        capture(event, distinct_id=uid, properties=props)
        lat[i] = pc() - t  # type: ignore[index]
        return t

    return fire_posthog


def _identity(sdk: str) -> dict:
    if sdk not in ("klime", "klime-1.1"):
        return {}
    import klime

    return {
        "klime_file": os.path.abspath(klime.__file__),
        "klime_version": getattr(klime, "__version__", None),
    }


def _klime_stats(sdk: str, client: object) -> object:
    if sdk != "klime":
        return None
    try:
        return client.stats()  # type: ignore[attr-defined]
    except Exception as exc:  # an older or newer klime: not the harness's business
        return {"error": repr(exc)}


def _percentiles(values_ns: object) -> dict:
    """Nearest-rank percentiles, µs (the same figures as run.py's worker)."""
    from _worker import _percentiles as percentiles  # a sibling script: os, sys, time only

    return percentiles(values_ns)


# --------------------------------------------------------------------------- modes


def _paced(sdk: str, spec: dict) -> dict:
    import array
    import threading

    n = int(spec["events"])
    rate = float(spec["rate"])
    end_limit = spec.get("end_limit")
    client, end = _make_client(sdk, str(spec["url"]))
    lat = array.array("q", bytes(8 * n))
    lag = array.array("q", bytes(8 * n))  # how late each call started against its schedule
    fire = _firer(sdk, client, lat)
    pc = time.perf_counter_ns
    sleep = time.sleep
    active = threading.active_count
    period_ns = 1e9 / rate
    threads_peak = active()

    cpu0 = time.process_time_ns()
    first_ns = time.monotonic_ns()
    start = pc()
    i = 0
    while i < n:
        # every call whose time has come (call k is due at start + k / rate)
        due = min(n, int((pc() - start) * rate / 1e9) + 1)
        while i < due:
            t = fire(i)
            lag[i] = t - start - int(i * period_ns)
            i += 1
        threads = active()
        if threads > threads_peak:
            threads_peak = threads
        if i >= n:
            break
        now = pc()
        next_slot = start + ((now - start) // SLOT_NS + 1) * SLOT_NS
        wake = max(next_slot, start + int(i * period_ns))
        if wake > now:
            sleep((wake - now) / 1e9)
    last_call_ns = time.monotonic_ns()
    span_ns = pc() - start
    threads_calls = active()

    end_start_ns = time.monotonic_ns()
    end_error = None
    if end_limit is None:
        end()
        completed = True
    else:
        errors: list = []

        def run_end() -> None:
            try:
                end()
            except BaseException as exc:  # reported, not raised: the process leaves anyway
                errors.append(repr(exc))

        ender = threading.Thread(target=run_end, name="bench-end", daemon=True)
        ender.start()
        ender.join(float(end_limit))
        completed = not ender.is_alive()
        end_error = errors[0] if errors else None
    end_ns = time.monotonic_ns()
    cpu_ns = time.process_time_ns() - cpu0

    first_call = lag[0] + start if n else start
    last_start = start + int((n - 1) * period_ns) + lag[n - 1] if n else start
    result = {
        "sdk": sdk,
        "events": n,
        "rate": rate,
        "first_ns": first_ns,
        "last_call_ns": last_call_ns,
        "end_start_ns": end_start_ns,
        "end_ns": end_ns,
        "end_completed": completed,
        "end_error": end_error,
        "cpu_ns": cpu_ns,
        "calls_span_ns": span_ns,
        # achieved offered rate: calls between the first and the last call's start
        "offered_per_s": (n - 1) / ((last_start - first_call) / 1e9)
        if n > 1 and last_start > first_call
        else float("nan"),
        "threads_peak": max(threads_peak, threads_calls),
        "lag": _percentiles(lag),
        "sdk_stats": _klime_stats(sdk, client),
        "pid": os.getpid(),
    }
    result.update(_percentiles(lat))
    result.update(_identity(sdk))
    return result


def _exit(sdk: str, spec: dict) -> dict:
    """Track ``events`` as fast as possible; the caller writes the result and returns, and
    the interpreter's exit (with the SDK's atexit hooks) is what the parent times."""
    import array

    n = int(spec["events"])
    client, _end = _make_client(sdk, str(spec["url"]))
    lat = array.array("q", bytes(8 * n))
    fire = _firer(sdk, client, lat)
    first_ns = time.monotonic_ns()
    for i in range(n):
        fire(i)
    last_call_ns = time.monotonic_ns()
    result = {
        "sdk": sdk,
        "events": n,
        "first_ns": first_ns,
        "last_call_ns": last_call_ns,
        "sdk_stats": _klime_stats(sdk, client),
        "pid": os.getpid(),
    }
    result.update(_percentiles(lat))
    result.update(_identity(sdk))
    return result


def _burst(sdk: str, spec: dict) -> dict:
    """Track ``events`` as fast as possible, then the SDK's normal end."""
    import array

    n = int(spec["events"])
    client, end = _make_client(sdk, str(spec["url"]))
    lat = array.array("q", bytes(8 * n))
    fire = _firer(sdk, client, lat)
    first_ns = time.monotonic_ns()
    for i in range(n):
        fire(i)
    last_call_ns = time.monotonic_ns()
    end()
    end_ns = time.monotonic_ns()
    result = {
        "sdk": sdk,
        "events": n,
        "first_ns": first_ns,
        "last_call_ns": last_call_ns,
        "end_ns": end_ns,
        "sdk_stats": _klime_stats(sdk, client),
        "pid": os.getpid(),
    }
    result.update(_percentiles(lat))
    result.update(_identity(sdk))
    return result


def _load(spec: dict) -> dict:
    """``connections`` keep-alive clients posting 20-event batches (klime-sized events)
    back to back."""
    import http.client
    import json
    import threading
    import urllib.parse

    url = urllib.parse.urlsplit(str(spec["url"]))
    path = url.path.rstrip("/") + "/v1/batch"
    conns = int(spec["connections"])
    seconds = float(spec["seconds"])
    lats: list = [[] for _ in range(conns)]
    errors = [0]
    start_gate = threading.Barrier(conns + 1)
    pc = time.perf_counter_ns

    import _workload

    # 20 events shaped like klime's (the workload's properties), ids filled in per request
    marker = "\u0000id\u0000"
    events = [
        {
            "type": "track",
            "messageId": marker,
            "timestamp": "2024-01-01T00:00:00.000Z",
            "event": _workload.EVENT,
            "userId": f"user_{j}",
            "properties": _workload.properties(j),
            "context": {"library": {"name": "python-sdk", "version": "0"}},
        }
        for j in range(20)
    ]
    pieces = json.dumps({"batch": events}).split(json.dumps(marker))

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
        seq = 0
        out = lats[k]
        start_gate.wait()
        stop = pc() + int(seconds * 1e9)
        while pc() < stop:
            ids = [f'"c{k}-{seq}-{j}"' for j in range(20)]
            seq += 1
            body = "".join(p + i for p, i in zip(pieces, ids)) + pieces[-1]
            body = body.encode()
            t = pc()
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                errors[0] += 1
                conn.close()
                continue
            out.append(pc() - t)
        conn.close()

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(conns)]
    for th in threads:
        th.start()
    start_gate.wait()
    t0 = time.monotonic_ns()
    for th in threads:
        th.join(seconds + 60)
    t1 = time.monotonic_ns()
    every = [x for per in lats for x in per]
    result = {"requests": len(every), "errors": errors[0], "first_ns": t0, "end_ns": t1, "connections": conns}
    result.update(_percentiles(every) if every else {})
    return result


if __name__ == "__main__":
    main()
