"""CPU time of the HTTP sender per request: this checkout's against another's, same run.

What one ``HttpSender.send`` of a 20-event batch costs on its own thread, against the
benchmark collector on 127.0.0.1 (answering at once, in this process: its CPU time is not
the worker's). Each measurement is a fresh worker process that sends a warm-up batch (the
HTTP stack's import and the connection), then ``--requests`` batches one after the other,
and reports its process CPU time and wall time per request. Workers of the two checkouts
alternate, ``--repeat`` times each; medians and their ratio are printed.

    .venv/bin/python benchmarks/sender_cpu.py --baseline-src /tmp/base_b8264bc/src

The sender's CPU time is what competes with the application's threads for the
interpreter (caller p99.9, delivered events/s; see docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _collector import CountingCollector
from _process import run_worker, worker_env

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(os.path.dirname(HERE), "src")
BATCH = 20


def worker(spec: Dict[str, Any]) -> None:
    """In the worker: ``spec["requests"]`` sends of one batch; CPU and wall µs per request."""
    from klime._deadline import Deadline
    from klime._events import encode_track
    from klime.senders.http import HttpSender

    events = [encode_track("Clicked", {"plan": "pro", "n": i}, f"user-{i}", None) for i in range(BATCH)]
    sender = HttpSender("bench-key", spec["url"])
    warm = sender.send(events, Deadline.after(10))  # imports the HTTP stack, opens the connection
    assert warm.error is None, warm.error
    n = int(spec["requests"])
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        result = sender.send(events, Deadline.after(10))
        assert result.error is None, result.error
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    with open(spec["out"], "w", encoding="utf-8") as fh:
        json.dump({"cpu_us": cpu / n * 1e6, "wall_us": wall / n * 1e6}, fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", required=True, help="the src directory of the checkout to compare")
    parser.add_argument("--requests", type=int, default=3000, help="requests per worker (default 3000)")
    parser.add_argument("--repeat", type=int, default=3, help="workers per checkout (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = parser.parse_args()
    srcs = {"klime": SRC, "klime-base": os.path.abspath(args.baseline_src)}
    figures: Dict[str, List[Dict[str, float]]] = {name: [] for name in srcs}
    load_before = os.getloadavg()[0]
    with CountingCollector() as collector, tempfile.TemporaryDirectory() as workdir:
        for i in range(args.repeat):
            order = list(srcs) if i % 2 == 0 else list(reversed(srcs))
            for name in order:
                run = f"{name}-{i}"
                spec = {"url": collector.url(run), "requests": args.requests}
                done = run_worker(__file__, "sender", name, spec, workdir, 300, worker_env(srcs[name]))
                figures[name].append(done.result)
                print(f"[{i + 1}/{args.repeat}] {name:10s} CPU {done.result['cpu_us']:6.1f} µs/request  "
                      f"wall {done.result['wall_us']:6.1f} µs/request", flush=True)
                collector.forget(run)
    med = {n: {k: statistics.median(f[k] for f in figures[n]) for k in ("cpu_us", "wall_us")} for n in srcs}
    print(f"{args.requests} requests of {BATCH} events per worker, {args.repeat} workers each; python "
          f"{sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after")
    print(f"{'':12s} {'CPU µs/request':>15s} {'wall µs/request':>16s}")
    for name in srcs:
        print(f"{name:12s} {med[name]['cpu_us']:15.1f} {med[name]['wall_us']:16.1f}")
    ratio = med["klime"]["cpu_us"] / med["klime-base"]["cpu_us"]
    print(f"klime / klime-base, CPU per request: {ratio:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"figures": figures, "medians": med, "cpu_ratio": ratio}, fh, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "sender":
        worker(json.loads(sys.argv[3]))
    else:
        main()
