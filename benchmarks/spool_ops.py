"""What each operation of the durable spool (klime.spool) costs, on this machine.

    .venv/bin/python benchmarks/spool_ops.py [--repeat 300] [--sizes 1,20,100] [--dir DIR]
        [--backlog 0,100000] [--synchronous NORMAL] [--json]

For each batch size N: ``append`` of N events, ``claim`` of N, ``ack`` of that batch,
``release`` of one, and ``adopt`` of a dead owner's N rows, each timed ``--repeat`` times
(median, 90th and 99th percentile, in microseconds), with events of the size of a typical
track call (~230 bytes). ``--backlog`` first fills the spool with that many rows of another
(live) owner, to show the costs do not grow with the spool. ``open`` and ``stats`` are timed
too. The directory defaults to a fresh temporary one on the disk that holds /tmp (use
``--dir`` to measure elsewhere, e.g. /dev/shm to leave the disk out). A benchmark, not a
test: nothing asserts on these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from klime.spool import Spool

EVENT = (
    b'{"type":"track","messageId":"%08d-5d0b-4b0e-9d84-9a1b2c3d4e5f","timestamp":"2026-05-09T07:35:25.123Z",'
    b'"event":"Button Clicked","userId":"user_123","properties":{"plan":"pro","seats":3},'
    b'"context":{"library":{"name":"python-sdk","version":"0.1.0"}}}'
)


def events(start: int, n: int) -> List[bytes]:
    return [EVENT % (start + i) for i in range(n)]


def summary(samples: List[float]) -> Dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6

    return {"p50": statistics.median(ordered) * 1e6, "p90": at(0.90), "p99": at(0.99)}


def timed(fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def run(directory: str, sizes: List[int], repeat: int, backlog: int, synchronous: str) -> Dict[str, object]:
    results: Dict[str, object] = {}
    opens = []
    for _ in range(20):
        opens.append(timed(lambda: Spool.open(directory, synchronous=synchronous).close()))
    results["open+close"] = summary(opens)
    other = Spool.open(directory, synchronous=synchronous)  # a live owner holding the backlog
    for start in range(0, backlog, 1000):
        other.append(events(10**7 + start, min(1000, backlog - start)))
    spool = Spool.open(directory, synchronous=synchronous)
    seq = 0
    for n in sizes:
        row: Dict[str, Dict[str, float]] = {}
        samples: Dict[str, List[float]] = {"append": [], "claim": [], "ack": [], "release": [], "adopt": []}
        for _ in range(repeat):
            batch_events = events(seq, n)
            seq += n
            samples["append"].append(timed(spool.append, batch_events))
            started = time.perf_counter()
            claimed = spool.claim(n)
            samples["claim"].append(time.perf_counter() - started)
            assert len(claimed) == n
            samples["ack"].append(timed(spool.ack, claimed))
        for _ in range(min(repeat, 100)):
            spool.append(events(seq, n))
            seq += n
            claimed = spool.claim(n)
            samples["release"].append(timed(spool.release, claimed, retry_at=0.0))
            spool.ack(spool.claim(n))
        for _ in range(min(repeat, 30)):
            dead = Spool.open(directory, synchronous=synchronous)
            dead.append(events(seq, n))
            seq += n
            dead.close()  # its rows stay, its lock is free: a dead owner
            samples["adopt"].append(timed(spool.adopt))
            spool.ack(spool.claim(n))
        for name, values in samples.items():
            row[name] = summary(values)
        results[f"{n} events"] = row
    stats_times = [timed(spool.stats) for _ in range(20)]
    results["stats"] = summary(stats_times)
    spool.close()
    other.close()
    return results


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--sizes", default="1,20,100")
    parser.add_argument("--backlog", default="0,100000", help="rows of another owner already spooled")
    parser.add_argument("--dir", default=None, help="parent directory for the spool (default: a temp dir)")
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    report: Dict[str, object] = {
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "synchronous": args.synchronous,
        "runs": {},
    }
    for backlog in (int(x) for x in args.backlog.split(",")):
        parent = tempfile.mkdtemp(prefix="klime-spool-bench-", dir=args.dir)
        try:
            report["runs"][f"backlog {backlog}"] = run(  # type: ignore[index]
                os.path.join(parent, "spool"), sizes, args.repeat, backlog, args.synchronous
            )
        finally:
            shutil.rmtree(parent, ignore_errors=True)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(
        f"klime spool, CPython {report['python']}, SQLite {report['sqlite']}, {report['machine']}, "
        f"load {report['load']:.2f}, synchronous={args.synchronous}; microseconds, p50 / p90 / p99"
    )
    for name, figures in report["runs"].items():  # type: ignore[attr-defined]
        print(f"\n{name}:")
        for key, value in figures.items():
            if "p50" in value:
                print(f"  {key:<12} {value['p50']:8.0f} {value['p90']:8.0f} {value['p99']:8.0f}")
                continue
            for op, v in value.items():
                print(f"  {key:<10} {op:<8} {v['p50']:8.0f} {v['p90']:8.0f} {v['p99']:8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
