"""Soaks: many events through a randomly faulting collector, and a black-holed endpoint.

Each soak runs the SDK in a child process (this file, run as a script) so that its peak RSS
is the SDK's and not the test runner's or the collector's; the collector runs here, in the
test process, and the two sides are reconciled event by event afterwards.

1. ``test_soak_faulting_collector``: ``KLIME_SOAK_EVENTS`` events (10,000 by default,
   100,000 with ``make soak``) tracked by 8 threads at ``KLIME_SOAK_RATE`` events/s in all
   (5,000) against a collector that faults at random (seeded: ``KLIME_SOAK_SEED``).
   Figures: tracked, acknowledged, reported to ``on_error``, dropped, duplicates by
   messageId, peak RSS, and they must add up.
2. ``test_soak_black_holed_endpoint``: 1,000 events/s for ``KLIME_SOAK_SECONDS`` seconds
   (5 by default, 60 with ``make soak``) against an endpoint that never answers, with every
   option at its default; the events the SDK holds must stay bounded by its queue cap
   (``max_queue_size`` + one batch in flight), and so must its RSS growth.

Set ``KLIME_SOAK_REPORT=path.json`` to keep the figures (docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

HERE = Path(__file__).resolve()
EVENTS = int(os.environ.get("KLIME_SOAK_EVENTS", "10000"))
SECONDS = float(os.environ.get("KLIME_SOAK_SECONDS", "5"))
SEED = int(os.environ.get("KLIME_SOAK_SEED", "20240501"))
#: Events per second from all threads together, so that the soak lasts (20 s at full size)
#: and the queue overflows only when faults stall the sender, as in production.
SOAK_RATE = float(os.environ.get("KLIME_SOAK_RATE", "5000"))
THREADS = int(os.environ.get("KLIME_SOAK_THREADS", "8"))

#: The faulting collector's schedule: one draw per request.
RATES = {
    "500": 0.05,
    "503": 0.03,
    "429": 0.03,
    "408": 0.02,
    "413": 0.02,
    "400": 0.005,
    "partial:0,7": 0.03,
    "reset_before_read": 0.03,
    "reset_after_read": 0.03,
    "non_json_200": 0.01,
    "unexpected_200": 0.01,
    "slow:0.02": 0.02,
    "drip:0.001": 0.01,
    "blackhole": 0.003,
    "slow:0.8": 0.003,  # answers after the read timeout: the ambiguous case, retried
}
#: The soak client's sender read timeout (the ambiguous "slow:0.8" exceeds it).
SOAK_READ_TIMEOUT = 0.5
RECORDING_FAULTS = {"slow", "drip"}
AMBIGUOUS_REASONS = ("read timed out", "being sent")


def _report(name: str, figures: Dict[str, Any]) -> None:
    print(f"\n{name}: " + json.dumps(figures))
    path = os.environ.get("KLIME_SOAK_REPORT")
    if path:
        existing: Dict[str, Any] = {}
        if os.path.exists(path):
            with open(path) as f:
                existing = json.load(f)
        existing[name] = figures
        with open(path, "w") as f:
            json.dump(existing, f, indent=2)


def _run_child(mode: str, args: Dict[str, Any], env: Dict[str, str], timeout: float) -> Dict[str, Any]:
    out = Path(args["out"])
    proc = subprocess.Popen(
        [sys.executable, str(HERE), mode, json.dumps(args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, output.decode(errors="replace")[-4000:]
    with out.open() as f:
        result: Dict[str, Any] = json.load(f)
    return result


def seq_of(event: Dict[str, Any]) -> int:
    body = event.get("properties") or event.get("traits") or {}
    return int(body["seq"])


# ---------------------------------------------------------------------------------------
# 1. the faulting collector


@pytest.mark.slow
@pytest.mark.timeout(300 + int(EVENTS / 100))
def test_soak_faulting_collector(src_env, tmp_path):
    from conftest import WRITE_KEY
    from klime.devserver import Collector

    with Collector(write_key=WRITE_KEY) as collector:
        collector.set_random_faults(SEED, RATES)
        started = time.monotonic()
        child = _run_child(
            "soak",
            {
                "url": collector.url,
                "key": WRITE_KEY,
                "events": EVENTS,
                "rate": SOAK_RATE,
                "out": str(tmp_path / "soak.json"),
            },
            src_env,
            timeout=120 + EVENTS / 100,
        )
        elapsed = time.monotonic() - started
        collector.set_random_faults(None, {})
        collector.set_mode(None)
        accepted_events = collector.events()
        requests = collector.requests()

    stats = child["stats"]
    reported = Counter(child["reported_seqs"])
    accepted = Counter(seq_of(e) for e in accepted_events)
    ids: Dict[int, Set[str]] = defaultdict(set)
    for e in accepted_events:
        ids[seq_of(e)].add(e["messageId"])
    for seq, mid in zip(child["reported_seqs"], child["reported_ids"]):
        ids[seq].add(mid)
    ambiguous: Set[int] = set(child["ambiguous_seqs"])
    for r in requests:
        if r.fault in RECORDING_FAULTS and r.body:
            ambiguous.update(seq_of(e) for e in r.json()["batch"])
        elif r.body and r.answered_at is not None and r.answered_at - r.started_at >= 0.8 * SOAK_READ_TIMEOUT:
            # answered too late for the client's read timeout (a loaded machine): the
            # client cannot know it arrived and sends it again, with the same messageIds
            ambiguous.update(seq_of(e) for e in r.json()["batch"])
    message_ids = [e["messageId"] for e in accepted_events]
    duplicates = len(message_ids) - len(set(message_ids))
    both = set(accepted) & set(reported)

    figures = {
        "events": EVENTS,
        "threads": THREADS,
        "rate/s": SOAK_RATE,
        "seed": SEED,
        "tracked": stats["tracked"],
        "acknowledged (distinct)": len(accepted),
        "sent (client)": stats["sent"],
        "reported to on_error": sum(reported.values()),
        "failed": stats["failed"],
        "dropped": stats["dropped"],
        "queued at the end": stats["queued"],
        "duplicates by messageId": duplicates,
        "acknowledged and reported (ambiguous)": len(both),
        "requests": stats["requests"],
        "retries": stats["retries"],
        "faulted requests": sum(1 for r in requests if r.fault),
        "peak RSS MB": round(child["peak_rss_kb"] / 1024, 1),
        "RSS before tracking MB": round(child["rss_before_kb"] / 1024, 1),
        "tracking s": round(child["tracking_s"], 2),
        "flush+shutdown s": round(child["drain_s"], 2),
        "total s": round(elapsed, 1),
    }
    _report("soak", figures)

    # everything adds up
    assert stats["tracked"] == EVENTS, figures
    assert stats["queued"] == 0, figures
    assert stats["tracked"] == stats["sent"] + stats["failed"] + stats["dropped"], figures
    assert stats["failed"] + stats["dropped"] == sum(reported.values()) == child["on_error_events"], figures
    assert max(reported.values(), default=0) <= 1, "an event was reported twice"
    assert set(accepted) | set(reported) == set(range(EVENTS)), "an event vanished"
    assert stats["sent"] == sum(1 for s in accepted if not reported[s]), figures
    assert not [s for s, m in ids.items() if len(m) > 1], "an event changed its messageId"
    unexplained = ({s for s, n in accepted.items() if n > 1} | both) - ambiguous
    assert not unexplained, ("duplicates/overlaps without an ambiguous request", sorted(unexplained)[:20])
    # the soak really was a soak
    assert figures["faulted requests"] > 0 and stats["retries"] > 0


def _soak_child(args: Dict[str, Any]) -> None:
    import resource
    import threading

    import klime
    from klime.senders.http import HttpSender

    reports: List[Any] = []
    lock = threading.Lock()

    def on_error(error: klime.SendError, events: List[Dict[str, Any]]) -> None:
        with lock:
            reports.append((error.message, [(seq_of(e), e["messageId"]) for e in events]))

    sender = HttpSender(
        args["key"], args["url"], read_timeout=SOAK_READ_TIMEOUT, retry_max_attempts=5, retry_initial_delay=5
    )
    client = klime.Client(
        args["key"],
        sender=sender,
        transport="background",
        flush_interval=50,
        max_batch_size=100,
        max_queue_size=10_000,
        on_error=on_error,
    )
    rss_before = _rss_kb()
    n = int(args["events"])
    per = n // THREADS
    chunks = [range(i * per, n if i == THREADS - 1 else (i + 1) * per) for i in range(THREADS)]

    def produce(seqs: range) -> None:
        rate = float(args["rate"]) / THREADS
        begin = time.monotonic()
        for done, seq in enumerate(seqs):
            if done % 50 == 0:  # pace: at most `rate` events per second per thread
                ahead = done / rate - (time.monotonic() - begin)
                if ahead > 0:
                    time.sleep(ahead)
            kind = seq % 10
            if kind < 8:
                client.track("Soak", {"seq": seq, "plan": "pro", "n": seq % 97}, user_id=f"user-{seq % 1000}")
            elif kind == 8:
                client.identify(f"user-{seq % 1000}", {"seq": seq, "email": f"u{seq}@example.com"})
            else:
                client.group(f"org-{seq % 50}", {"seq": seq, "name": "Acme"}, user_id=f"user-{seq % 1000}")

    start = time.monotonic()
    pool = [threading.Thread(target=produce, args=(c,)) for c in chunks]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    tracking = time.monotonic() - start
    start = time.monotonic()
    client.flush(timeout=300)
    client.shutdown(timeout=30)
    drain = time.monotonic() - start
    stats = client.stats()
    with lock:
        seqs = [s for _, evs in reports for s, _ in evs]
        mids = [m for _, evs in reports for _, m in evs]
        ambiguous = [s for msg, evs in reports if any(r in msg for r in AMBIGUOUS_REASONS) for s, _ in evs]
    result = {
        "stats": stats,
        "reported_seqs": seqs,
        "reported_ids": mids,
        "ambiguous_seqs": ambiguous,
        "on_error_events": len(seqs),
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_before_kb": rss_before,
        "tracking_s": tracking,
        "drain_s": drain,
    }
    with open(args["out"], "w") as f:
        json.dump(result, f)


def _held(client: Any) -> int:
    """Events the background transport holds in memory: queued, dropped but not yet
    reported, and in flight (white-box: ``stats()["queued"]`` leaves out the middle one)."""
    t = client.transport
    with t.lock:
        memory = t._memory
        return len(memory.events) + len(memory.drops.held) + t.flights.held_locked()


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


# ---------------------------------------------------------------------------------------
# 2. the black-holed endpoint

RATE = 1000  # events per second
PAYLOAD = 4096  # bytes of padding per event, so that holding events shows in RSS


@pytest.mark.slow
@pytest.mark.timeout(300 + int(SECONDS * 2))
def test_soak_black_holed_endpoint(src_env, tmp_path):
    from conftest import WRITE_KEY
    from klime.devserver import Collector, Fault

    with Collector(write_key=WRITE_KEY) as collector:
        collector.set_mode(Fault.blackhole())
        child = _run_child(
            "blackhole",
            {"url": collector.url, "key": WRITE_KEY, "seconds": SECONDS, "out": str(tmp_path / "bh.json")},
            src_env,
            timeout=60 + SECONDS * 2,
        )
    samples = child["samples"]
    stats = child["stats"]
    cap = child["max_queue_size"] + child["max_batch_size"]
    full = [s for s in samples if s["held"] >= child["max_queue_size"]]
    assert full, "the queue never filled: the soak was too short"
    rss_at_full = full[0]["rss_kb"]
    growth_mb = (max(s["rss_kb"] for s in samples) - rss_at_full) / 1024
    event_mb = child["event_bytes"] / 1e6
    figures = {
        "seconds": SECONDS,
        "rate/s": RATE,
        "event bytes": child["event_bytes"],
        "tracked": stats["tracked"],
        "most events held": max(s["held"] for s in samples),
        "cap (max_queue_size + one batch)": cap,
        "RSS when the queue filled MB": round(rss_at_full / 1024, 1),
        "peak RSS MB": round(max(s["rss_kb"] for s in samples) / 1024, 1),
        "RSS growth after the queue filled MB": round(growth_mb, 1),
        "dropped": stats["dropped"],
        "failed": stats["failed"],
        "reported to on_error": child["on_error_events"],
        "shutdown s": round(child["shutdown_s"], 2),
    }
    _report("blackhole", figures)
    # the books balance and shutdown kept its deadline, whatever the memory does
    assert stats["tracked"] == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"], figures
    assert stats["queued"] == 0 and child["on_error_events"] == stats["failed"] + stats["dropped"], figures
    assert child["shutdown_s"] < child["shutdown_timeout"] + 1.5, figures
    # bounded by the queue cap: what is held, and what that costs in memory
    # dropped events wait a moment for the reporter thread to hand them to on_error: allow
    # that in-transit share, but nothing that grows with time
    assert figures["most events held"] <= 2 * cap, figures
    assert growth_mb <= max(8.0, 2 * cap * event_mb), figures


def _blackhole_child(args: Dict[str, Any]) -> None:
    import threading

    import klime

    count = [0]
    lock = threading.Lock()

    def on_error(error: klime.SendError, events: List[Dict[str, Any]]) -> None:
        with lock:
            count[0] += len(events)

    client = klime.Client(args["key"], endpoint=args["url"], on_error=on_error)  # every default
    pad = "x" * PAYLOAD
    seconds = float(args["seconds"])
    samples: List[Dict[str, Any]] = []
    start = time.monotonic()
    next_sample = start
    i = 0
    while True:
        now = time.monotonic()
        if now - start >= seconds:
            break
        target = int((now - start) * RATE)
        while i < target:
            client.track("Blackholed", {"seq": i, "pad": pad}, user_id="u")
            i += 1
        if now >= next_sample:
            samples.append({"t": now - start, "held": _held(client), "rss_kb": _rss_kb()})
            next_sample += 0.25
        time.sleep(0.001)
    from klime._events import encode_track

    event_bytes = len(encode_track("Blackholed", {"seq": i, "pad": pad}, "u", None))
    shutdown_timeout = 2.0
    t0 = time.monotonic()
    client.shutdown(timeout=shutdown_timeout)
    shutdown_s = time.monotonic() - t0
    with lock:
        reported = count[0]
    result = {
        "samples": samples,
        "stats": client.stats(),
        "on_error_events": reported,
        "max_queue_size": client.max_queue_size,
        "max_batch_size": client.max_batch_size,
        "event_bytes": event_bytes,
        "shutdown_s": shutdown_s,
        "shutdown_timeout": shutdown_timeout,
    }
    with open(args["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    _mode, _args = sys.argv[1], json.loads(sys.argv[2])
    {"soak": _soak_child, "blackhole": _blackhole_child}[_mode](_args)
    sys.stdout.flush()
    os._exit(0)  # the black hole may still hold a daemon sender thread; do not wait for exit hooks
