"""History import: ``klime import`` of N events against a collector a round trip away.

    python benchmarks/backfill.py [--events 1000000] [--delay-ms 50] [--concurrency 32]
        [--peers posthog] [--kills 10] [--seed S] [--json out.json] [--keep FILE]

Writes N generated Klime events (NDJSON, no messageIds: the import derives them) to a
temporary file, starts the counting collector (``_collector.py``) in this process, answering
each request ``delay`` ms after it arrived, and runs ``python -m klime.cli import FILE`` in a
child process. Reported: events/s sustained (N over the time from the child's start to its
end, and over first-to-last batch at the collector), the child's peak RSS and CPU time per
event (``resource.getrusage(RUSAGE_CHILDREN)``, read after each child), the theoretical limit
(100 events a request x requests in flight / round trip), and whether every event arrived
exactly once by id.

With ``--kills K`` it then imports the same file again under another run id, with a
checkpoint, SIGKILLs the child at K random moments (uniform over the time a whole import
took) and restarts it each time, then lets the last one finish: every event must arrive, and
the events sent twice must stay below one in-flight window (``--concurrency`` x 100) per kill.

Peers, run the same way when they can reach a local collector: PostHog's Python SDK with
``historical_migration=True`` (capture with each event's timestamp and a uuid, then
``shutdown()``), at its defaults otherwise but a queue large enough to hold the file (its
default 10,000 would drop events). Mixpanel's import path is not run: its Python library
(``mixpanel``) is not installed here, and its ``/import`` endpoint answers with Mixpanel's
own protocol, which the counting collector does not speak.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from _collector import CountingCollector  # noqa: E402

WRITE_KEY = "bench-write-key"

POSTHOG_CHILD = r"""
import json, sys, uuid
from posthog import Posthog
path, host, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = Posthog("phc_bench", host=host, historical_migration=True, max_queue_size=total + 1)
ns = uuid.UUID("00000000-0000-0000-0000-000000000001")
with open(path, "rb") as f:
    for n, line in enumerate(f):
        e = json.loads(line)
        client.capture(e["event"], distinct_id=e["userId"], properties=e["properties"],
                       timestamp=e["timestamp"], uuid=str(uuid.uuid5(ns, str(n))))
client.shutdown()
"""


def generate(path: str, count: int) -> int:
    """Write ``count`` events; return the file's size in bytes. Blocks."""
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            f.write(
                json.dumps(
                    {
                        "type": "track",
                        "event": "Order Completed",
                        "userId": f"user_{i % 50_000}",
                        "groupId": f"org_{i % 2_000}",
                        "timestamp": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}T{i % 24:02d}:{i % 60:02d}:"
                        f"{(i // 60) % 60:02d}.{i % 1000:03d}Z",
                        "properties": {
                            "order_id": f"o_{i}",
                            "revenue": round(i % 997 * 1.37, 2),
                            "items": i % 9,
                        },
                    },
                    separators=(",", ":"),
                )
                + "\n"
            )
    return os.path.getsize(path)


def run_child(argv: List[str], env: Dict[str, str]) -> Dict[str, Any]:
    """Run one child to its end; its wall time, peak RSS and CPU (this process's children
    are measured one at a time: ru_maxrss is the largest child so far, so peers run after)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "status": done.returncode,
        "stderr": done.stderr[-2000:],
        "wall_s": wall,
        "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024.0,
    }


def measure(
    collector: CountingCollector, run: str, argv: List[str], env: Dict[str, str], total: int
) -> Dict[str, Any]:
    child = run_child(argv, env)
    stats = collector.stats(run)
    span = (stats["last_ns"] - stats["first_ns"]) / 1e9 if stats["first_ns"] else 0.0
    return {
        **child,
        "events": total,
        "delivered": stats["unique"],
        "duplicates": stats["duplicates"],
        "requests": stats["requests"],
        "peak_in_flight": stats["peak_in_flight"],
        "rate_wall": stats["unique"] / child["wall_s"] if child["wall_s"] else 0.0,
        "rate_collector": stats["unique"] / span if span else 0.0,
        "cpu_us_per_event": child["cpu_s"] / max(1, stats["unique"]) * 1e6,
        "exactly_once": stats["unique"] == total and stats["duplicates"] == 0,
    }


def killed_and_resumed(
    collector: CountingCollector, argv: List[str], env: Dict[str, str], total: int, kills: int,
    span_s: float, seed: int, checkpoint: str,
) -> Dict[str, Any]:
    """Import with ``checkpoint``, SIGKILL the child ``kills`` times at random moments, resume
    each time, let the last run finish; what arrived, and how much was sent twice."""
    rng = random.Random(seed)
    argv = [*argv, "--checkpoint", checkpoint]
    moments: List[float] = []
    started = time.monotonic()
    for _ in range(kills):
        child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        at = rng.uniform(0.3, max(0.6, span_s / kills))  # each run makes some progress, then dies
        try:
            child.wait(timeout=at)
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
            moments.append(round(at, 2))
    final = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    stats = collector.stats("kills")
    return {
        "kills": len(moments),
        "kill_moments_s": moments,
        "final_status": final.returncode,
        "wall_s": wall,
        "delivered": stats["unique"],
        "duplicates": stats["duplicates"],
        "every_event": stats["unique"] == total,
    }


def table(results: Dict[str, Dict[str, Any]], limit: float, args: argparse.Namespace) -> str:
    rows = [
        f"N = {args.events:,} events, round trip {args.delay_ms:g} ms, "
        f"klime --concurrency {args.concurrency}; "
        f"limit 100 x {args.concurrency} / {args.delay_ms:g} ms = {limit:,.0f} events/s",
        "",
        "| sdk | events/s (wall) | events/s (first to last batch) | peak RSS MB | CPU µs/event | requests "
        "| peak in flight | delivered once |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "skipped" in r:
            rows.append(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue
        rows.append(
            f"| {name} | {r['rate_wall']:,.0f} | {r['rate_collector']:,.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r['cpu_us_per_event']:.1f} | {r['requests']:,} | {r['peak_in_flight']} | "
            f"{'yes' if r['exactly_once'] else 'NO'} ({r['delivered']:,} ids, {r['duplicates']} duplicates) |"
        )
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--delay-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--peers", default="posthog", help="comma-separated: posthog, or '' for none")
    parser.add_argument("--kills", type=int, default=0, help="then kill and resume an import K times")
    parser.add_argument("--seed", type=int, default=1, help="of the kill moments")
    parser.add_argument("--json", metavar="FILE")
    parser.add_argument("--keep", metavar="FILE", help="write the generated file here (kept)")
    args = parser.parse_args(argv)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(REPO, "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["KLIME_WRITE_KEY"] = WRITE_KEY
    results: Dict[str, Dict[str, Any]] = {}
    results_kills: Optional[Dict[str, Any]] = None
    limit = 100 * args.concurrency / (args.delay_ms / 1000.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or os.path.join(tmp, "history.ndjson")
        size = generate(path, args.events)
        print(f"generated {args.events:,} events, {size / 1e6:,.0f} MB", file=sys.stderr)
        with CountingCollector(delay=args.delay_ms / 1000.0) as collector:
            klime_argv = [
                sys.executable,
                "-m",
                "klime.cli",
                "import",
                path,
                "--quiet",
                "--endpoint",
                collector.url("klime"),
                "--concurrency",
                str(args.concurrency),
            ]
            results["klime import"] = measure(collector, "klime", klime_argv, env, args.events)
            if results["klime import"]["status"] != 0:
                print(results["klime import"]["stderr"], file=sys.stderr)
            collector.forget("klime")
            if args.kills:
                kill_argv = list(klime_argv)
                kill_argv[kill_argv.index(collector.url("klime"))] = collector.url("kills")
                results_kills = killed_and_resumed(
                    collector,
                    kill_argv,
                    env,
                    args.events,
                    args.kills,
                    results["klime import"]["wall_s"],
                    args.seed,
                    os.path.join(tmp, "checkpoint.json"),
                )
                window = args.concurrency * 100
                results_kills["window"] = window
                kills = max(1, results_kills["kills"])
                results_kills["duplicates_per_kill"] = results_kills["duplicates"] / kills
                print(
                    f"killed {results_kills['kills']} times at {results_kills['kill_moments_s']} s "
                    "and resumed: "
                    f"{results_kills['delivered']:,} of {args.events:,} events arrived "
                    f"({'all' if results_kills['every_event'] else 'NOT ALL'}), "
                    f"{results_kills['duplicates']:,} sent twice "
                    f"({results_kills['duplicates_per_kill']:,.0f} a kill; one window is {window:,})",
                    file=sys.stderr,
                )
                collector.forget("kills")
            for peer in filter(None, args.peers.split(",")):
                if peer != "posthog":
                    results[peer] = {"skipped": "no local-collector harness for it"}
                    continue
                ph_argv = [
                    sys.executable,
                    "-c",
                    POSTHOG_CHILD,
                    path,
                    collector.url("posthog"),
                    str(args.events),
                ]
                results["posthog (historical_migration)"] = measure(
                    collector, "posthog", ph_argv, env, args.events
                )
            results["mixpanel /import"] = {"skipped": "the mixpanel library is not installed; own protocol"}
    text = table(results, limit, args)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            everything = {"args": vars(args), "limit": limit, "results": results, "kills": results_kills}
            json.dump(everything, f, indent=1)
    ok = bool(results["klime import"].get("exactly_once"))
    if results_kills is not None:
        below_window = results_kills["duplicates_per_kill"] < results_kills["window"]
        ok = ok and results_kills["every_event"] and below_window
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
