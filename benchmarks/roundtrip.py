"""Round trips: klime vs klime 1.1.0 vs segment-analytics-python vs posthog at real-network latency.

    python benchmarks/roundtrip.py [--delays 0,50,200] [--rates 1000,5000,10000]
        [--seconds 5,4,3] [--sdks klime,klime-1.1,segment,posthog] [--baseline-src PATH]
        [--repeat K] [--json out.json] [--markdown] [--check] [--quick]

One local collector (``_collector.py``) answers each request ``delay`` ms after it arrived,
each keep-alive connection on its own thread, so concurrent requests are delayed
independently, as by a network. Each SDK runs at its defaults (only the write key and the
host are given; no callback, no logging configured) in a fresh process (``_paced.py``),
paced at each rate for a few seconds, then ends as its documentation says (klime
``shutdown()``; Segment ``flush()`` + ``shutdown()``; PostHog ``shutdown()``). Per run:
tracked, delivered (distinct ids), lost, duplicates, the stderr lines the SDK printed,
time to drain, sustained delivered rate, caller p50/p99, CPU per delivered event, peak
requests in flight and requests made. Three more cases: the burst (1,000 events as fast as
possible at each delay, then the SDK's normal end: caller p50/p99/max and the app's time),
the exit flush (1,000 events as fast as possible, then the script just ends) and a
collector answering 503 to everything.

``klime-1.1`` is Klime's previous SDK, ``klime`` 1.1.0 from PyPI (``KlimeClient(key,
endpoint=url)``, its end ``shutdown()``), run in a venv of its own (``_venvs.py``: it has
this project's import name), made on demand with pip; without the package index it is
skipped, with the reason.

``--baseline-src PATH`` adds ``klime-base``: klime imported from another checkout's ``src``
(e.g. ``git worktree add /tmp/klime-base <commit>``), run beside this checkout's klime.

Exit status: 0 when the harness worked (targets may FAIL: pass ``--check`` to turn a FAIL
into exit status 1), 2 when a run failed (a worker crashed or timed out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import _process  # noqa: E402
import _venvs  # noqa: E402
from _collector import CountingCollector, Span  # noqa: E402
from _process import BenchError, WorkerRun  # noqa: E402

WORKER = os.path.join(HERE, "_paced.py")
SDKS = ("klime", "klime-base", "klime-1.1", "segment", "posthog")
DEFAULT_SDKS = "klime,klime-1.1,segment,posthog"
#: The peers of the 5x target (klime 1.1.0 is shown beside them, not a target's peer).
PEERS = ("segment", "posthog")
FAMILY = {
    "klime": "klime",
    "klime-base": "klime",
    "klime-1.1": "klime-1.1",
    "segment": "segment",
    "posthog": "posthog",
    "none": "none",
}
DISTRIBUTIONS = {"segment": "segment-analytics-python", "posthog": "posthog"}

#: Seconds per rate when --seconds is not given (the issue's cases).
DEFAULT_SECONDS = {1000: 5.0, 5000: 4.0, 10000: 3.0}
FALLBACK_SECONDS = 3.0
#: klime's default exit_timeout (seconds): the exit case's bound.
KLIME_EXIT_TIMEOUT_S = 2.0
#: The 503 case: in flight is looked at from this long after the first rejection on.
SETTLE_S = 1.0


@dataclass
class ExitCase:
    events: int = 1000
    delay_ms: float = 50.0


@dataclass
class BurstCase:
    events: int = 1000
    delays_ms: Tuple[float, ...] = (0.0, 50.0, 200.0)


@dataclass
class FaultCase:
    delay_ms: float = 50.0
    status: int = 503
    rate: float = 1000.0
    seconds: float = 3.0
    end_limit: float = 3.0  # seconds the SDK's end may take before the process leaves


@dataclass
class Plan:
    delays_ms: List[float]
    rates: List[float]
    seconds: Dict[float, float]
    sdks: List[str]
    repeat: int
    exit: Optional[ExitCase]
    fault: Optional[FaultCase]
    timeout: float
    collector_check: float  # seconds of the collector check (0: none)
    baseline_src: Optional[str] = None
    burst: Optional[BurstCase] = None
    #: the interpreter of an SDK that cannot run in this venv (klime-1.1)
    pythons: Dict[str, str] = field(default_factory=dict)

    def events(self, rate: float) -> int:
        return max(1, round(rate * self.seconds[rate]))


# --------------------------------------------------------------------------- workers


def child_env(sdk: str, baseline_src: Optional[str]) -> Dict[str, str]:
    """A worker's environment (:func:`_process.worker_env`): this checkout's klime, the
    baseline's for ``klime-base``, none for ``klime-1.1``."""
    if sdk == "klime-1.1":
        return _process.worker_env(None)
    use_baseline = sdk == "klime-base" and baseline_src
    return _process.worker_env(baseline_src if use_baseline else os.path.join(REPO, "src"))


def run_worker(
    mode: str,
    sdk: str,
    spec: Dict[str, Any],
    workdir: str,
    timeout: float,
    env: Dict[str, str],
    python: Optional[str] = None,
) -> WorkerRun:
    """Run one paced worker (:mod:`_process`); ``sdk`` runs as its family's client."""
    return _process.run_worker(WORKER, mode, FAMILY.get(sdk, sdk), spec, workdir, timeout, env, python)


def check_identity(sdk: str, result: Dict[str, Any], baseline_src: Optional[str]) -> None:
    """klime, klime-base and klime-1.1 must have imported the klime they were meant to."""
    if sdk == "klime-1.1":
        if result.get("klime_version") != _venvs.KLIME11_VERSION:
            raise BenchError(
                f"klime-1.1 imported klime {result.get('klime_version')} from {result.get('klime_file')}"
            )
        return
    if FAMILY.get(sdk) != "klime":
        return
    path = os.path.realpath(result.get("klime_file") or "")
    want = os.path.realpath(
        baseline_src if sdk == "klime-base" and baseline_src else os.path.join(REPO, "src")
    )
    if not path.startswith(want + os.sep):
        raise BenchError(f"{sdk} imported klime from {path}, not from {want}")


# --------------------------------------------------------------------------- metrics


def stderr_summary(text: str) -> Tuple[int, str]:
    lines = [line for line in text.splitlines() if line.strip()]
    return len(lines), (lines[0].strip()[:200] if lines else "")


def peak_in_flight(spans: Sequence[Span], since_ns: int, until_ns: Optional[int] = None) -> int:
    """The most requests in flight at once at any moment in ``[since_ns, until_ns)``."""
    points: List[Tuple[int, int]] = []
    for arrived, answered, _status in spans:
        if answered <= since_ns or (until_ns is not None and arrived >= until_ns):
            continue
        points.append((max(arrived, since_ns), 1))
        points.append((answered, -1))
    points.sort()  # at one instant an answer (-1) sorts before an arrival (+1)
    now = peak = 0
    for _, step in points:
        now += step
        peak = max(peak, now)
    return peak


def requests_between(spans: Sequence[Span], start_ns: int, end_ns: int) -> int:
    return sum(1 for arrived, _answered, _status in spans if start_ns <= arrived <= end_ns)


def _nan() -> float:
    return float("nan")


def paced_metrics(
    raw: Dict[str, Any], col: Dict[str, Any], spans: Sequence[Span], stderr: str
) -> Dict[str, Any]:
    n = int(raw["events"])
    unique = int(col["unique"])
    last = col["last_ns"]
    first_ns, last_call_ns, end_ns = raw["first_ns"], raw["last_call_ns"], raw["end_ns"]
    e2e_s = (last - first_ns) / 1e9 if last is not None else _nan()
    lines, first_line = stderr_summary(stderr)
    run_s = (end_ns - first_ns) / 1e9
    calls_s = (last_call_ns - first_ns) / 1e9
    rejected = [s for s in spans if s[2] >= 400]
    late = sorted(answered - arrived for arrived, answered, _status in spans)
    settle_from = (min(s[1] for s in rejected) + int(SETTLE_S * 1e9)) if rejected else None
    return {
        "offered_per_s": raw["offered_per_s"],
        "tracked": n,
        "delivered": unique,
        "lost": n - unique,
        "duplicates": int(col["duplicates"]),
        "stderr_lines": lines,
        "stderr_first": first_line,
        "drain_s": (last - last_call_ns) / 1e9 if last is not None else _nan(),
        "delivered_per_s": unique / e2e_s if unique and e2e_s > 0 else 0.0,
        "p50_us": raw["p50_us"],
        "p99_us": raw["p99_us"],
        "p999_us": raw["p999_us"],
        "max_us": raw["max_us"],
        "cpu_s": raw["cpu_ns"] / 1e9,
        "cpu_us_per_event": raw["cpu_ns"] / 1000.0 / unique if unique else _nan(),
        "cpu_us_per_call": raw["cpu_ns"] / 1000.0 / n,
        "peak_in_flight": int(col["peak_in_flight"]),
        "requests": int(col["requests"]),
        "rejected": int(col["rejected"]),
        "connections": int(col["connections"]),
        "lag_p99_ms": raw["lag"].get("p99_us", _nan()) / 1000.0,
        "lag_max_ms": raw["lag"].get("max_us", _nan()) / 1000.0,
        "end_s": (end_ns - raw["end_start_ns"]) / 1e9,
        "end_completed": bool(raw["end_completed"]),
        "threads_peak": int(raw["threads_peak"]),
        "run_s": run_s,
        "requests_per_s": len(spans) / run_s if run_s > 0 else _nan(),
        "requests_per_s_tracking": requests_between(spans, first_ns, last_call_ns) / calls_s
        if calls_s > 0
        else _nan(),
        "settled_peak_in_flight": peak_in_flight(spans, settle_from, end_ns) if settle_from else 0,
        # arrival to answer at the collector: the configured delay plus the collector's lateness
        "answer_p99_ms": late[min(len(late) - 1, len(late) * 99 // 100)] / 1e6 if late else _nan(),
    }


def exit_metrics(run: WorkerRun, col: Dict[str, Any]) -> Dict[str, Any]:
    raw = run.result
    n = int(raw["events"])
    unique = int(col["unique"])
    last = col["last_ns"]
    lines, first_line = stderr_summary(run.stderr)
    return {
        "tracked": n,
        "delivered": unique,
        "lost": n - unique,
        "duplicates": int(col["duplicates"]),
        "stderr_lines": lines,
        "stderr_first": first_line,
        "calls_s": (raw["last_call_ns"] - raw["first_ns"]) / 1e9,
        "to_last_batch_s": (last - raw["last_call_ns"]) / 1e9 if last is not None else _nan(),
        "to_exit_s": (run.exit_ns - raw["last_call_ns"]) / 1e9,
        "requests": int(col["requests"]),
        "peak_in_flight": int(col["peak_in_flight"]),
    }


def burst_metrics(run: WorkerRun, col: Dict[str, Any]) -> Dict[str, Any]:
    raw = run.result
    n = int(raw["events"])
    unique = int(col["unique"])
    last = col["last_ns"]
    lines, first_line = stderr_summary(run.stderr)
    return {
        "tracked": n,
        "delivered": unique,
        "lost": n - unique,
        "duplicates": int(col["duplicates"]),
        "stderr_lines": lines,
        "stderr_first": first_line,
        "p50_us": raw["p50_us"],
        "p99_us": raw["p99_us"],
        "max_us": raw["max_us"],
        # the app's time for the burst: its calls; then what the SDK's end call blocked
        "calls_s": (raw["last_call_ns"] - raw["first_ns"]) / 1e9,
        "end_s": (raw["end_ns"] - raw["last_call_ns"]) / 1e9,
        "to_last_batch_s": (last - raw["last_call_ns"]) / 1e9 if last is not None else _nan(),
        "requests": int(col["requests"]),
        "peak_in_flight": int(col["peak_in_flight"]),
    }


@dataclass
class Sample:
    case: str  # "paced", "burst", "exit", "fault"
    sdk: str
    delay_ms: float
    rate: float  # 0 for the exit case (as fast as possible)
    seconds: float
    repeat: int
    worker: Dict[str, Any]
    collector: Dict[str, Any]
    metrics: Dict[str, Any]


GroupKey = Tuple[str, float, float, str]


def median(values: Sequence[Any]) -> float:
    nums = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
    return statistics.median(nums) if nums else float("nan")


def group(samples: Sequence[Sample]) -> Dict[GroupKey, Dict[str, Any]]:
    """Medians per (case, delay, rate, sdk); ``lost_max`` the worst repeat; text and flags
    from the first repeat that has them."""
    runs: Dict[GroupKey, List[Sample]] = {}
    for s in samples:
        runs.setdefault((s.case, s.delay_ms, s.rate, s.sdk), []).append(s)
    out: Dict[GroupKey, Dict[str, Any]] = {}
    for key, rows in runs.items():
        med: Dict[str, Any] = {}
        for name, value in rows[0].metrics.items():
            if isinstance(value, bool) or isinstance(value, str):
                continue
            med[name] = median([r.metrics[name] for r in rows])
        med["lost_max"] = max(r.metrics["lost"] for r in rows)
        med["stderr_first"] = next((r.metrics["stderr_first"] for r in rows if r.metrics["stderr_first"]), "")
        if "end_completed" in rows[0].metrics:
            med["end_completed"] = all(r.metrics["end_completed"] for r in rows)
        med["repeats"] = len(rows)
        med["seconds"] = rows[0].seconds
        out[key] = med
    return out


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    measured: str = "not run"
    passed: Optional[bool] = None  # None: not measured here

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else "PASS" if self.passed else "FAIL"


def _ms(delay: float) -> str:
    return f"{delay:g} ms"


def _rate(rate: float) -> str:
    return f"{rate:,.0f} ev/s"


def targets(plan: Plan, groups: Dict[GroupKey, Dict[str, Any]]) -> List[Target]:
    out: List[Target] = []

    def paced(delay: float, rate: float, sdk: str) -> Optional[Dict[str, Any]]:
        return groups.get(("paced", delay, rate, sdk))

    for delay, rate in ((50.0, 5000.0), (200.0, 1000.0)):
        got = paced(delay, rate, "klime")
        secs = f" x {got['seconds']:g} s" if got else ""
        t = Target(f"{_ms(delay)}, {_rate(rate)}{secs}: klime loses 0 events")
        if got:
            t.measured = f"{got['lost_max']:,.0f} lost"
            t.passed = got["lost_max"] == 0
        out.append(t)

    t = Target("50 ms, 10,000 ev/s: klime's sustained delivered rate ≥ 5 x the best peer's")
    got = paced(50.0, 10000.0, "klime")
    peers = {p: paced(50.0, 10000.0, p) for p in PEERS}
    peers = {p: g for p, g in peers.items() if g}
    if got and peers:
        best_name, best = max(peers.items(), key=lambda kv: kv[1]["delivered_per_s"])
        rate_best = best["delivered_per_s"]
        ratio = got["delivered_per_s"] / rate_best if rate_best > 0 else float("inf")
        t.measured = f"{ratio:.2f} x ({got['delivered_per_s']:,.0f} vs {best_name} {rate_best:,.0f} ev/s)"
        t.passed = ratio >= 5.0
    out.append(t)

    # "Not worse than today's": against klime-base (today's SDK, --baseline-src) in the same
    # conditions when it ran; else against klime's own loopback figure at the same rate
    # (which also counts what a slow server does to any SDK's caller: more threads waiting).
    have_base = any(k[0] == "paced" and k[3] == "klime-base" for k in groups)
    for metric, label in (("p50_us", "p50"), ("p99_us", "p99")):
        if have_base:
            t = Target(f"caller {label} at every delay and rate ≤ 1.1 x klime-base's in the same case")
        else:
            t = Target(f"caller {label} at every delay ≤ 1.1 x klime's own 0 ms {label} at the same rate")
        worst: Optional[Tuple[float, float, float]] = None
        for delay in plan.delays_ms:
            if delay == 0 and not have_base:
                continue
            for rate in plan.rates:
                here = paced(delay, rate, "klime")
                ref = paced(delay, rate, "klime-base") if have_base else paced(0.0, rate, "klime")
                if not here or not ref or not ref[metric] > 0:
                    continue
                ratio = here[metric] / ref[metric]
                if worst is None or ratio > worst[0]:
                    worst = (ratio, delay, rate)
        if worst is not None:
            t.measured = f"worst {worst[0]:.2f} x ({_ms(worst[1])}, {_rate(worst[2])})"
            t.passed = worst[0] <= 1.1
        out.append(t)

    t = Target(
        "exit: 1,000 events, 50 ms, no flush call: klime delivers all within exit_timeout "
        f"({KLIME_EXIT_TIMEOUT_S:g} s)"
    )
    got = groups.get(("exit", 50.0, 0.0, "klime"))
    if got and plan.exit and plan.exit.events == 1000:
        t.measured = (
            f"{got['lost_max']:,.0f} lost; last batch {got['to_last_batch_s']:.2f} s, "
            f"exit {got['to_exit_s']:.2f} s after the last call"
        )
        t.passed = got["lost_max"] == 0 and got["to_last_batch_s"] <= KLIME_EXIT_TIMEOUT_S
    out.append(t)

    fault = plan.fault
    standard = fault is not None and fault.delay_ms == 50.0 and fault.status == 503
    key = ("fault", fault.delay_ms if fault else 0.0, fault.rate if fault else 0.0)
    got = groups.get((*key, "klime")) if standard else None
    base = groups.get((*key, "klime-base")) if standard else None
    t = Target("503 to everything: klime's request rate ≤ 1.1 x klime-base's (no retry storm)")
    if got and base:
        ratio = got["requests_per_s"] / base["requests_per_s"] if base["requests_per_s"] > 0 else float("inf")
        t.measured = f"{got['requests_per_s']:.2f} vs {base['requests_per_s']:.2f} req/s ({ratio:.2f} x)"
        t.passed = ratio <= 1.1
    elif got:
        t.measured = f"{got['requests_per_s']:.2f} req/s; no --baseline-src"
    out.append(t)
    t = Target(f"503 to everything: klime's peak in flight from {SETTLE_S:g} s after the first 503 on ≤ 1")
    if got:
        extra = f"; klime-base {base['settled_peak_in_flight']:.0f}" if base else ""
        t.measured = (
            f"{got['settled_peak_in_flight']:.0f} (peak over the run {got['peak_in_flight']:.0f}{extra})"
        )
        t.passed = got["settled_peak_in_flight"] <= 1
    out.append(t)
    return out


# --------------------------------------------------------------------------- tables


def _fmt(spec: str, value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and value != value:
        return "-"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "∞"
    return spec.format(value)


def table(headers: List[str], rows: List[List[str]], markdown: bool, left: int = 1) -> str:
    """A table; the first ``left`` columns are text (left-aligned), the rest numbers."""
    if markdown:
        out = ["| " + " | ".join(headers) + " |"]
        out.append("|" + "|".join("---" if i < left else "---:" for i in range(len(headers))) + "|")
        out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(out)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).ljust(w) if i < left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _ratio(a: float, b: float) -> str:
    if not (a == a and b == b):
        return "-"
    if b == 0:
        return "-" if a == 0 else "∞"
    return f"{a / b:.2f}"


def render(plan: Plan, groups: Dict[GroupKey, Dict[str, Any]], results: List[Target], markdown: bool) -> str:
    parts: List[str] = []

    def heading(text: str) -> None:
        parts.append(("**" + text + "**" if markdown else text) + "\n")

    order = [s for s in SDKS if s in plan.sdks]
    rows = []
    for delay in plan.delays_ms:
        for rate in plan.rates:
            for sdk in order:
                g = groups.get(("paced", delay, rate, sdk))
                if not g:
                    continue
                rows.append(
                    [
                        f"{delay:g}",
                        f"{rate:,.0f} x {g['seconds']:g} s",
                        sdk,
                        _fmt("{:,.0f}", g["offered_per_s"]),
                        _fmt("{:,.0f}", g["tracked"]),
                        _fmt("{:,.0f}", g["delivered"]),
                        _fmt("{:,.0f}", g["lost"]),
                        _fmt("{:,.0f}", g["duplicates"]),
                        _fmt("{:,.0f}", g["stderr_lines"]),
                        _fmt("{:.2f}", g["drain_s"]),
                        _fmt("{:,.0f}", g["delivered_per_s"]),
                        _fmt("{:.1f}", g["p50_us"]),
                        _fmt("{:.1f}", g["p99_us"]),
                        _fmt("{:,.0f}", g["max_us"]),
                        _fmt("{:.1f}", g["cpu_us_per_event"]),
                        _fmt("{:.0f}", g["peak_in_flight"]),
                        _fmt("{:,.0f}", g["requests"]),
                    ]
                )
    if rows:
        heading("Paced runs (each SDK at its defaults)")
        parts.append(
            table(
                [
                    "delay ms",
                    "rate",
                    "SDK",
                    "offered ev/s",
                    "tracked",
                    "delivered",
                    "lost",
                    "dup",
                    "stderr lines",
                    "drain s",
                    "delivered ev/s",
                    "p50 µs",
                    "p99 µs",
                    "max µs",
                    "CPU µs/ev",
                    "peak in flight",
                    "requests",
                ],
                rows,
                markdown,
                left=3,
            )
            + "\n"
        )

    floor = [
        f"{_rate(rate)}: {g['cpu_us_per_call']:.1f} µs CPU per call, offered {g['offered_per_s']:,.0f} ev/s, "
        f"calls late by p99 {g['lag_p99_ms']:.2f} ms"
        for rate in plan.rates
        for g in [groups.get(("pacer", 0.0, rate, "none"))]
        if g
    ]
    if floor:
        parts.append(
            ("- " if markdown else "")
            + "the pacer alone (no SDK; its CPU is inside every figure above): "
            + "; ".join(floor)
            + "\n"
        )

    others = [s for s in order if s != "klime"]
    rows = []
    for delay in plan.delays_ms:
        for rate in plan.rates:
            k = groups.get(("paced", delay, rate, "klime"))
            if not k:
                continue
            for peer in others:
                p = groups.get(("paced", delay, rate, peer))
                if not p:
                    continue
                rows.append(
                    [
                        f"{delay:g}",
                        f"{rate:,.0f}",
                        peer,
                        _ratio(k["delivered_per_s"], p["delivered_per_s"]),
                        _ratio(k["p50_us"], p["p50_us"]),
                        _ratio(k["p99_us"], p["p99_us"]),
                        _ratio(k["cpu_us_per_event"], p["cpu_us_per_event"]),
                        _ratio(k["drain_s"], p["drain_s"]),
                        f"{k['lost']:,.0f} / {p['lost']:,.0f}",
                    ]
                )
    if rows:
        heading(
            "klime / each peer, same run (delivered ev/s: above 1 is better for klime; the rest: below 1)"
        )
        parts.append(
            table(
                [
                    "delay ms",
                    "rate ev/s",
                    "klime /",
                    "delivered ev/s",
                    "p50",
                    "p99",
                    "CPU/ev",
                    "drain",
                    "lost klime / peer",
                ],
                rows,
                markdown,
                left=3,
            )
            + "\n"
        )

    if plan.burst:
        rows = []
        for delay in plan.burst.delays_ms:
            for sdk in order:
                g = groups.get(("burst", delay, 0.0, sdk))
                if not g:
                    continue
                rows.append(
                    [
                        f"{delay:g}",
                        sdk,
                        _fmt("{:.1f}", g["p50_us"]),
                        _fmt("{:,.0f}", g["p99_us"]),
                        _fmt("{:,.0f}", g["max_us"]),
                        _fmt("{:.3f}", g["calls_s"]),
                        _fmt("{:.3f}", g["end_s"]),
                        _fmt("{:,.0f}", g["tracked"]),
                        _fmt("{:,.0f}", g["delivered"]),
                        _fmt("{:,.0f}", g["lost"]),
                        _fmt("{:,.0f}", g["stderr_lines"]),
                        _fmt("{:,.0f}", g["requests"]),
                    ]
                )
        if rows:
            heading(
                f"Burst: {plan.burst.events:,} events as fast as possible, then the SDK's normal end "
                "(each SDK at its defaults)"
            )
            parts.append(
                table(
                    [
                        "delay ms",
                        "SDK",
                        "caller p50 µs",
                        "caller p99 µs",
                        "caller max µs",
                        "app time for the burst s",
                        "then the end call s",
                        "tracked",
                        "delivered",
                        "lost",
                        "stderr lines",
                        "requests",
                    ],
                    rows,
                    markdown,
                    left=2,
                )
                + "\n"
            )

    if plan.exit:
        rows = []
        for sdk in order:
            g = groups.get(("exit", plan.exit.delay_ms, 0.0, sdk))
            if not g:
                continue
            rows.append(
                [
                    sdk,
                    _fmt("{:,.0f}", g["tracked"]),
                    _fmt("{:,.0f}", g["delivered"]),
                    _fmt("{:,.0f}", g["lost"]),
                    _fmt("{:,.0f}", g["stderr_lines"]),
                    _fmt("{:.3f}", g["calls_s"]),
                    _fmt("{:.2f}", g["to_last_batch_s"]),
                    _fmt("{:.2f}", g["to_exit_s"]),
                    _fmt("{:,.0f}", g["requests"]),
                    _fmt("{:.0f}", g["peak_in_flight"]),
                ]
            )
        if rows:
            heading(
                f"Exit: {plan.exit.events:,} events as fast as possible, then the script ends "
                f"(no flush/shutdown call), {_ms(plan.exit.delay_ms)} round trip"
            )
            parts.append(
                table(
                    [
                        "SDK",
                        "tracked",
                        "delivered",
                        "lost",
                        "stderr lines",
                        "calls s",
                        "last call → last batch s",
                        "last call → exit s",
                        "requests",
                        "peak in flight",
                    ],
                    rows,
                    markdown,
                )
                + "\n"
            )

    if plan.fault:
        f = plan.fault
        rows = []
        for sdk in order:
            g = groups.get(("fault", f.delay_ms, f.rate, sdk))
            if not g:
                continue
            rows.append(
                [
                    sdk,
                    _fmt("{:,.0f}", g["tracked"]),
                    _fmt("{:,.0f}", g["requests"]),
                    _fmt("{:.2f}", g["run_s"]),
                    _fmt("{:.2f}", g["requests_per_s"]),
                    _fmt("{:.2f}", g["requests_per_s_tracking"]),
                    _fmt("{:.0f}", g["peak_in_flight"]),
                    _fmt("{:.0f}", g["settled_peak_in_flight"]),
                    _fmt("{:,.0f}", g["stderr_lines"]),
                    "yes" if g.get("end_completed") else f"no (left after {f.end_limit:g} s)",
                ]
            )
        if rows:
            heading(
                f"{f.status} to everything, answered after {_ms(f.delay_ms)}: "
                f"{_rate(f.rate)} x {f.seconds:g} s, then the SDK's end (given {f.end_limit:g} s)"
            )
            parts.append(
                table(
                    [
                        "SDK",
                        "tracked",
                        "requests",
                        "run s",
                        "req/s over the run",
                        "req/s while tracking",
                        "peak in flight",
                        f"peak from {SETTLE_S:g} s after the first {f.status}",
                        "stderr lines",
                        "end returned",
                    ],
                    rows,
                    markdown,
                )
                + "\n"
            )

    rows = []
    rank = {sdk: i for i, sdk in enumerate(order)}
    for (case, delay, rate, sdk), g in sorted(
        groups.items(), key=lambda kv: (rank.get(kv[0][3], len(rank)), kv[0][:3])
    ):
        if not g.get("stderr_first"):
            continue
        where = {
            "pacer": f"pacer alone, {_rate(rate)}",
            "paced": f"{_ms(delay)}, {_rate(rate)}",
            "exit": f"exit, {_ms(delay)}",
            "burst": f"burst, {_ms(delay)}",
            "fault": f"503, {_ms(delay)}",
        }[case]
        rows.append([sdk, where, _fmt("{:,.0f}", g["stderr_lines"]), g["stderr_first"]])
    heading("What reached stderr (first line of each run that printed any)")
    parts.append(
        (table(["SDK", "case", "lines", "first line"], rows, markdown, left=4) if rows else "nothing") + "\n"
    )

    heading("Targets (issue 11)")
    parts.append(
        table(
            ["target", "measured", "result"],
            [[t.name, t.measured, t.verdict] for t in results],
            markdown,
            left=2,
        )
    )
    return "\n".join(parts)


# --------------------------------------------------------------------------- versions


def _read_version(src: str) -> str:
    try:
        with open(os.path.join(src, "klime", "_version.py"), encoding="utf-8") as fh:
            text = fh.read()
        return text.split("=", 1)[1].strip().strip("\"'") if "=" in text else "?"
    except OSError:
        return "?"


def _git(path: str, *args: str) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", path, *args], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.strip()


def versions(plan: Plan) -> Dict[str, str]:
    from importlib import metadata

    src = os.path.join(REPO, "src")
    dirty = _git(REPO, "status", "--porcelain", "--", "src")
    out: Dict[str, str] = {
        "python": platform.python_version(),
        "klime": f"{_read_version(src)} ({_git(REPO, 'rev-parse', '--short', 'HEAD') or '?'}"
        + (", src/ has uncommitted changes)" if dirty else ")"),
    }
    if plan.baseline_src:
        root = os.path.dirname(os.path.abspath(plan.baseline_src))
        out["klime-base"] = (
            f"{_read_version(plan.baseline_src)} ({_git(root, 'rev-parse', '--short', 'HEAD') or '?'})"
        )
    if "klime-1.1" in plan.pythons:
        out["klime-1.1"] = f"{_venvs.KLIME11_VERSION} ({plan.pythons['klime-1.1']})"
    for sdk, dist in DISTRIBUTIONS.items():
        try:
            out[sdk] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[sdk] = "not installed"
    for dist in ("requests", "urllib3"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- main


def _floats(text: str, what: str, parser: argparse.ArgumentParser) -> List[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        parser.error(f"{what}: a comma-separated list of numbers, not {text!r}")
    if not values or any(v < 0 for v in values):
        parser.error(f"{what}: at least one value, none negative")
    return values


def make_plan(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Plan:
    if args.quick:
        delays, rates, secs = [0.0, 5.0], [400.0], [0.5]
        exit_case: Optional[ExitCase] = ExitCase(events=200, delay_ms=5.0)
        burst_events = 200
        fault: Optional[FaultCase] = FaultCase(delay_ms=5.0, rate=400.0, seconds=0.5, end_limit=0.5)
        check = 0.0
    else:
        delays, rates = [0.0, 50.0, 200.0], [1000.0, 5000.0, 10000.0]
        secs = []
        exit_case, fault, check = ExitCase(), FaultCase(), 2.0
        burst_events = 1000
    if args.delays is not None:
        delays = _floats(args.delays, "--delays", parser)
    if args.rates is not None:
        rates = _floats(args.rates, "--rates", parser)
        if any(r <= 0 for r in rates):
            parser.error("--rates must be positive")
    if args.seconds is not None:
        secs = _floats(args.seconds, "--seconds", parser)
    if secs and len(secs) not in (1, len(rates)):
        parser.error("--seconds: one value, or one per rate")
    if any(s <= 0 for s in secs):
        parser.error("--seconds must be positive")
    seconds = {
        rate: (secs[i] if len(secs) > 1 else secs[0]) if secs else DEFAULT_SECONDS.get(rate, FALLBACK_SECONDS)
        for i, rate in enumerate(rates)
    }
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    known = {"paced", "burst", "exit", "fault"}
    if cases - known:
        parser.error(f"--cases: unknown {', '.join(sorted(cases - known))}")
    if args.burst_events is not None:
        burst_events = args.burst_events
    burst = BurstCase(burst_events, tuple(delays)) if "burst" in cases and delays else None
    if "paced" not in cases:
        delays = []
    if "exit" not in cases:
        exit_case = None
    if "fault" not in cases:
        fault = None
    if args.exit_events is not None and exit_case is not None:
        exit_case.events = args.exit_events
    sdks = [s.strip() for s in args.sdks.split(",") if s.strip()]
    unknown = set(sdks) - set(SDKS)
    if unknown:
        parser.error(f"unknown SDKs: {', '.join(sorted(unknown))} (known: {', '.join(SDKS)})")
    baseline = os.path.abspath(args.baseline_src) if args.baseline_src else None
    if baseline:
        if not os.path.isfile(os.path.join(baseline, "klime", "__init__.py")):
            parser.error(
                f"--baseline-src {args.baseline_src}: no klime/__init__.py there (give the src directory)"
            )
        if "klime-base" not in sdks:
            sdks.append("klime-base")
    elif "klime-base" in sdks:
        parser.error("klime-base needs --baseline-src")
    return Plan(
        delays, rates, seconds, sdks, args.repeat, exit_case, fault, args.timeout, check, baseline, burst
    )


def collector_check(
    collector: CountingCollector, seconds: float, workdir: str, timeout: float
) -> Dict[str, Any]:
    """50 keep-alive connections posting back to back at a 50 ms delay: can the collector
    answer ~1,000 requests/s with each answer on time?"""
    run_id = f"check-{time.monotonic_ns()}"
    collector.configure(run_id, delay=0.05)
    cpu0 = time.process_time()
    run = run_worker(
        "load",
        "none",
        {"url": collector.url(run_id), "connections": 50, "seconds": seconds},
        workdir,
        timeout,
        child_env("klime", None),
    )
    cpu = time.process_time() - cpu0
    time.sleep(0.1)
    stats = collector.stats(run_id)
    late = sorted(answered - arrived - 50_000_000 for arrived, answered, _ in collector.spans(run_id))
    collector.forget(run_id)
    raw = run.result
    wall = (raw["end_ns"] - raw["first_ns"]) / 1e9
    return {
        "connections": raw["connections"],
        "delay_ms": 50.0,
        "requests": raw["requests"],
        "errors": raw["errors"],
        "requests_per_s": raw["requests"] / wall if wall > 0 else float("nan"),
        "ideal_per_s": raw["connections"] / 0.05,
        "answer_p50_ms": raw.get("p50_us", float("nan")) / 1000.0,
        "answer_p99_ms": raw.get("p99_us", float("nan")) / 1000.0,
        "peak_in_flight": stats["peak_in_flight"],
        "events_counted": stats["unique"],
        "bad_requests": stats["bad_requests"],
        # the collector's own view: how late after arrival + delay each answer was written
        "late_p50_ms": late[len(late) // 2] / 1e6 if late else float("nan"),
        "late_p99_ms": late[min(len(late) - 1, len(late) * 99 // 100)] / 1e6 if late else float("nan"),
        "collector_cpu_share": cpu / wall if wall > 0 else float("nan"),
    }


def describe_check(c: Dict[str, Any]) -> str:
    return (
        f"collector check: {c['connections']} keep-alive connections at a {c['delay_ms']:g} ms delay: "
        f"{c['requests_per_s']:,.0f} requests/s of an ideal {c['ideal_per_s']:,.0f}, answers p50 "
        f"{c['answer_p50_ms']:.1f} ms, p99 {c['answer_p99_ms']:.1f} ms (client side); answers written "
        f"p50 {c['late_p50_ms']:.2f} ms, p99 {c['late_p99_ms']:.2f} ms late (collector side); peak in flight "
        f"{c['peak_in_flight']}, collector CPU {100 * c['collector_cpu_share']:.0f} % of one core, "
        f"{c['errors']} errors, {c['bad_requests']} bad requests, {c['events_counted']:,} events counted"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--delays", help="round trips in ms, comma-separated (default 0,50,200)")
    parser.add_argument("--rates", help="offered events/s, comma-separated (default 1000,5000,10000)")
    parser.add_argument("--seconds", help="seconds per rate: one value, or one per rate (default 5,4,3)")
    parser.add_argument("--sdks", default=DEFAULT_SDKS, help="subset of " + ",".join(SDKS))
    parser.add_argument(
        "--baseline-src",
        metavar="PATH",
        help="the src directory of another klime checkout: runs as klime-base",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per case and SDK; medians reported (default 1)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--check", action="store_true", help="exit status 1 when a target FAILs")
    parser.add_argument(
        "--quick", action="store_true", help="a small fast run (smoke test): 0 and 5 ms, 400 ev/s x 0.5 s"
    )
    parser.add_argument("--exit-events", type=int, help="events of the exit case (default 1000)")
    parser.add_argument(
        "--cases",
        default="paced,burst,exit,fault",
        help="which cases to run (default paced,burst,exit,fault)",
    )
    parser.add_argument("--burst-events", type=int, help="events of the burst case (default 1000)")
    _venvs.add_klime11_options(parser)
    parser.add_argument(
        "--collector-check", action="store_true", help="only measure what the collector can take, then stop"
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds allowed per worker process (default 300)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.exit_events is not None and args.exit_events < 1:
        parser.error("--exit-events must be at least 1")
    if args.burst_events is not None and args.burst_events < 1:
        parser.error("--burst-events must be at least 1")
    plan = make_plan(args, parser)
    if "klime-1.1" in plan.sdks:
        try:
            found = _venvs.klime11(args.klime11_python, create=not args.no_create_venvs)
        except _venvs.Unavailable as exc:
            print(f"skipping klime-1.1: {exc}", file=sys.stderr)
            plan.sdks = [s for s in plan.sdks if s != "klime-1.1"]
        else:
            plan.pythons["klime-1.1"] = found.python
    installed = versions(plan)
    missing = [s for s in plan.sdks if s in DISTRIBUTIONS and installed[s] == "not installed"]
    if missing:
        print(f"skipping {', '.join(missing)}: not installed", file=sys.stderr)
        plan.sdks = [s for s in plan.sdks if s not in missing]
    progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        progress(
            f"note: the machine is busy (load average {load_before[0]:.2f} on {os.cpu_count()} CPUs); "
            "CPU and latency figures will be noisy"
        )
    envs = {sdk: child_env(sdk, plan.baseline_src) for sdk in plan.sdks}
    envs_default = child_env("klime", None)
    samples: List[Sample] = []
    broken: List[str] = []
    check: Optional[Dict[str, Any]] = None
    started = time.monotonic()

    def attempt(
        case: str,
        sdk: str,
        delay: float,
        rate: float,
        seconds: float,
        rep: int,
        spec: Dict[str, Any],
        status: int = 200,
    ) -> None:
        run_id = f"{case}-r{rep}-{sdk}-{delay:g}-{rate:g}"
        collector.configure(run_id, delay=delay / 1000.0, status=status)
        spec = dict(spec, url=collector.url(run_id))
        mode = case if case in ("exit", "burst") else "paced"
        env = envs.get(sdk) or envs_default
        cpu0 = time.process_time()
        try:
            run = run_worker(mode, sdk, spec, workdir, plan.timeout, env, plan.pythons.get(sdk))
            check_identity(sdk, run.result, plan.baseline_src)
        except BenchError as exc:
            broken.append(f"{case} {sdk} {_ms(delay)} {_rate(rate)}: {exc}")
            progress(f"  BROKEN {case} {sdk} {_ms(delay)} {_rate(rate)}: {str(exc).splitlines()[0]}")
            collector.forget(run_id)
            return
        time.sleep(min(0.3, delay / 1000.0 + 0.05))  # let answers still being written be recorded
        col = collector.stats(run_id)
        spans = collector.spans(run_id)
        collector.forget(run_id)
        col["collector_cpu_s"] = time.process_time() - cpu0
        if case == "pacer":
            metrics = paced_metrics(run.result, col, spans, run.stderr)
            note = (
                f"offered {metrics['offered_per_s']:7,.0f}/s  CPU {metrics['cpu_us_per_call']:.1f} µs/call  "
                f"late p99 {metrics['lag_p99_ms']:.2f} ms"
            )
        elif case == "exit":
            metrics = exit_metrics(run, col)
            note = f"lost {metrics['lost']:,}  exit {metrics['to_exit_s']:.2f} s"
        elif case == "burst":
            metrics = burst_metrics(run, col)
            note = (
                f"lost {metrics['lost']:,}  p99 {metrics['p99_us']:,.0f} µs  "
                f"max {metrics['max_us']:,.0f} µs  "
                f"calls {metrics['calls_s']:.3f} s  end {metrics['end_s']:.3f} s"
            )
        else:
            metrics = paced_metrics(run.result, col, spans, run.stderr)
            note = (
                f"offered {metrics['offered_per_s']:7,.0f}/s  lost {metrics['lost']:6,}  "
                f"{metrics['delivered_per_s']:7,.0f} ev/s  drain {metrics['drain_s']:5.2f} s  "
                f"p99 {metrics['p99_us']:6.1f} µs  in flight {metrics['peak_in_flight']}  "
                f"req/s {metrics['requests_per_s']:.1f}  answer p99 {metrics['answer_p99_ms']:.1f} ms"
            )
        samples.append(Sample(case, sdk, delay, rate, seconds, rep, run.result, col, metrics))
        progress(
            f"[{rep + 1}/{plan.repeat}] {case:<5} {sdk:<10} {_ms(delay):>6} {rate:>6,.0f}/s  {note}  "
            f"stderr {metrics['stderr_lines']}"
        )

    with tempfile.TemporaryDirectory(prefix="klime-roundtrip-") as workdir, CountingCollector() as collector:
        if args.collector_check or plan.collector_check:
            try:
                check = collector_check(collector, plan.collector_check or 3.0, workdir, plan.timeout)
            except BenchError as exc:
                print(f"collector check failed: {exc}", file=sys.stderr)
                return 2
            progress(describe_check(check))
            if args.collector_check:
                print(describe_check(check))
                return 0
        for rate in plan.rates if plan.delays_ms else []:  # the pacer alone, once per rate
            spec = {"events": plan.events(rate), "rate": rate}
            attempt("pacer", "none", 0.0, rate, plan.seconds[rate], 0, spec)
        for rep in range(plan.repeat):
            shift = rep % len(plan.sdks)
            order = plan.sdks[shift:] + plan.sdks[:shift]  # rotate: spread drift over SDKs
            for delay in plan.delays_ms:
                for rate in plan.rates:
                    secs = plan.seconds[rate]
                    for sdk in order:
                        spec = {"events": plan.events(rate), "rate": rate}
                        attempt("paced", sdk, delay, rate, secs, rep, spec)
            if plan.burst:
                for delay in plan.burst.delays_ms:
                    for sdk in order:
                        spec = {"events": plan.burst.events}
                        attempt("burst", sdk, delay, 0.0, 0.0, rep, spec)
            if plan.exit:
                for sdk in order:
                    attempt("exit", sdk, plan.exit.delay_ms, 0.0, 0.0, rep, {"events": plan.exit.events})
            if plan.fault:
                f = plan.fault
                for sdk in [s for s in order if FAMILY[s] == "klime"]:
                    spec = {
                        "events": max(1, round(f.rate * f.seconds)),
                        "rate": f.rate,
                        "end_limit": f.end_limit,
                    }
                    attempt("fault", sdk, f.delay_ms, f.rate, f.seconds, rep, spec, status=f.status)
    load_after = os.getloadavg()

    groups = group(samples)
    results = targets(plan, groups)
    bullet = "- " if args.markdown else ""
    print(
        f"{bullet}round trips {', '.join(_ms(d) for d in plan.delays_ms)}; rates "
        f"{', '.join(f'{_rate(r)} x {plan.seconds[r]:g} s' for r in plan.rates)}; {plan.repeat} run(s) each, "
        f"medians; python {installed['python']}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{time.monotonic() - started:.0f} s"
    )
    print(bullet + "versions: " + ", ".join(f"{k} {v}" for k, v in installed.items() if k != "python"))
    if check:
        print(bullet + describe_check(check))
    print()
    print(render(plan, groups, results, args.markdown))
    if broken:
        print("\nbroken runs:\n" + "\n".join(broken), file=sys.stderr)
    if args.json:
        report = {
            "plan": {
                "delays_ms": plan.delays_ms,
                "rates": plan.rates,
                "seconds": {str(k): v for k, v in plan.seconds.items()},
                "sdks": plan.sdks,
                "repeat": plan.repeat,
                "exit": plan.exit.__dict__ if plan.exit else None,
                "burst": plan.burst.__dict__ if plan.burst else None,
                "fault": plan.fault.__dict__ if plan.fault else None,
                "baseline_src": plan.baseline_src,
            },
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "versions": installed,
            "collector_check": check,
            "runs": [s.__dict__ for s in samples],
            "groups": [
                {"case": k[0], "delay_ms": k[1], "rate": k[2], "sdk": k[3], **v} for k, v in groups.items()
            ],
            "targets": [t.__dict__ | {"verdict": t.verdict} for t in results],
            "broken": broken,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str, allow_nan=True)
    if broken:
        return 2
    if args.check and any(t.passed is False for t in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
