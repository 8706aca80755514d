"""klime vs klime 1.1.0 vs segment-analytics-python vs posthog: the same workload, side by side.

    python benchmarks/run.py [--events N] [--repeat K] [--json out.json] [--markdown]

Each SDK runs in a fresh process (``_worker.py``) against one local counting collector
(``_collector.py``) that serves all three wire formats. The workload (``_workload.py``) is N
track calls with 6 properties, users ``user_<i % 1000>``, in a tight loop on the main thread.
Per run it reports the caller-thread latency of each call (p50/p99/p99.9/max, µs), the
delivered events per second end to end (first call to the last batch received by the
collector), the events lost (N minus distinct ids received), the peak RSS growth during the
workload and the SDK's import time (in separate fresh processes as well), then the medians
over K repeats, klime's ratios to each peer and the issue's targets as PASS/FAIL.

Configurations: klime with ``max_batch_size=100, max_queue_size=N`` (the one the targets
are about) and at its defaults; Segment and PostHog with their queue raised to N (batch size
100, their default) and at their defaults (queue 10,000, which drops events in this burst).
Klime's previous SDK, ``klime`` 1.1.0 from PyPI (``klime-1.1``), runs as a peer with the
same options (``KlimeClient(key, endpoint=url, max_queue_size=N, max_batch_size=100)``) and
at its defaults, in a venv of its own (``_venvs.py``: same import name as this project),
made on demand with pip; without the package index it is skipped, with the reason.
Targets compare klime with Segment at queue N (same conditions: nothing dropped); "best
peer" is the best of Segment and PostHog, the peers the targets were set against.

Exit status: 0 when the harness worked (targets may FAIL: pass ``--check`` to turn a FAIL
into exit status 1), 2 when a run failed (a worker crashed or timed out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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
from _collector import CountingCollector  # noqa: E402
from _process import BenchError  # noqa: E402

WORKER = os.path.join(HERE, "_worker.py")
#: The ``spool`` option a worker replaces with a new temporary directory.
FRESH_SPOOL = "<fresh>"
SDKS = ("klime", "klime-1.1", "segment", "posthog")
DISTRIBUTIONS = {"klime": "klime", "segment": "segment-analytics-python", "posthog": "posthog"}
#: The peers of the "best peer" targets (klime 1.1.0 is shown beside them, not a target's peer).
TARGET_PEERS = ("segment", "posthog")


@dataclass
class Config:
    key: str
    sdk: str
    label: str
    options: Dict[str, Any]
    informational: bool = False
    #: run klime from this ``src`` directory instead of this checkout's (a baseline)
    src: Optional[str] = None


#: The klime variants compared with ``klime`` (q=N) of the same run, and their bound on
#: each caller-latency ratio (variant / klime).
VARIANT_BOUND = 1.1


def configs(
    n: int,
    sdks: Sequence[str],
    with_defaults: bool,
    *,
    spool: bool = False,
    baseline_src: Optional[str] = None,
) -> List[Config]:
    """The configurations to run for ``n`` events."""
    out: List[Config] = []
    if "klime" in sdks:
        base = {"max_batch_size": 100, "max_queue_size": n}
        out.append(Config("klime", "klime", f"klime q={n}", base))
        if spool:  # the same, with the durable spool on (a fresh directory per run)
            out.append(Config("klime-spool", "klime", f"klime q={n} spool", dict(base, spool=FRESH_SPOOL)))
        if baseline_src:
            out.append(Config("klime-base", "klime", f"klime@base q={n}", dict(base), src=baseline_src))
        if with_defaults:
            out.append(Config("klime-default", "klime", "klime defaults", {}, informational=True))
            if baseline_src:
                key, label = "klime-base-default", "klime@base defaults"
                out.append(Config(key, "klime", label, {}, src=baseline_src, informational=True))
    if "klime-1.1" in sdks:
        old = {"max_queue_size": n, "max_batch_size": 100}
        out.append(Config("klime-1.1", "klime-1.1", f"klime 1.1.0 q={n}", old))
        if with_defaults:
            out.append(Config("klime-1.1-default", "klime-1.1", "klime 1.1.0 defaults", {}))
    if "segment" in sdks:
        out.append(
            Config("segment", "segment", f"segment q={n}", {"max_queue_size": n, "upload_size": 100})
        )
        if with_defaults:
            out.append(Config("segment-default", "segment", "segment defaults", {}))
    if "posthog" in sdks:
        out.append(Config("posthog", "posthog", f"posthog q={n}", {"max_queue_size": n, "flush_at": 100}))
        if with_defaults:
            out.append(Config("posthog-default", "posthog", "posthog defaults", {}))
    return out


# --------------------------------------------------------------------------- workers


def run_worker(
    mode: str,
    sdk: str,
    spec: Dict[str, Any],
    workdir: str,
    timeout: float,
    env: Dict[str, str],
    python: Optional[str] = None,
) -> Dict[str, Any]:
    """Run one worker process to completion (:mod:`_process`); its result."""
    return _process.run_worker(WORKER, mode, sdk, spec, workdir, timeout, env, python).result


def check_identity(cfg: Config, raw: Dict[str, Any]) -> None:
    """klime 1.1.0 and this klime share an import name: each run must have imported its own."""
    version = raw.get("sdk_version")
    if cfg.sdk == "klime-1.1" and version != _venvs.KLIME11_VERSION:
        raise BenchError(f"{cfg.label}: imported klime {version}, not {_venvs.KLIME11_VERSION}")
    if cfg.sdk == "klime" and version == _venvs.KLIME11_VERSION:
        raise BenchError(f"{cfg.label}: imported klime 1.1.0, not this checkout's")


# --------------------------------------------------------------------------- metrics


@dataclass
class Sample:
    """One run of one configuration, with the collector's view folded in."""

    raw: Dict[str, Any]
    arrived: Dict[str, Any]
    metrics: Dict[str, float] = field(default_factory=dict)


def derive(n: int, raw: Dict[str, Any], arrived: Dict[str, Any]) -> Dict[str, float]:
    unique = int(arrived["unique"])
    last = arrived["last_ns"]
    e2e_s = (last - raw["first_ns"]) / 1e9 if last is not None else float("nan")
    return {
        "p50_us": raw["p50_us"],
        "p99_us": raw["p99_us"],
        "p999_us": raw["p999_us"],
        "max_us": raw["max_us"],
        "mean_us": raw["mean_us"],
        "calls_s": (raw["calls_done_ns"] - raw["first_ns"]) / 1e9,
        "e2e_s": e2e_s,
        "delivered_per_s": unique / e2e_s if unique and e2e_s > 0 else 0.0,
        "delivered": unique,
        "lost": n - unique,
        "duplicates": int(arrived["duplicates"]),
        "requests": int(arrived["requests"]),
        "rss_growth_mib": raw["rss_growth_kib"] / 1024.0,
        "rss_peak_mib": raw["maxrss_end_kib"] / 1024.0,
        "rss_after_import_mib": raw["rss_after_import_kib"] / 1024.0,
        "construct_ms": raw["construct_s"] * 1000.0,
        "import_construct_ms": (raw["import_s"] + raw["construct_s"]) * 1000.0,
        "rss_base_mib": raw["rss_base_kib"] / 1024.0,
        "run_import_ms": raw["import_s"] * 1000.0,
    }


#: (key, label, format, lower_is_better) of the rows printed per configuration.
ROWS: List[Tuple[str, str, str, Optional[bool]]] = [
    ("p50_us", "caller p50 (µs)", "{:.1f}", True),
    ("p99_us", "caller p99 (µs)", "{:.1f}", True),
    ("p999_us", "caller p99.9 (µs)", "{:.0f}", True),
    ("max_us", "caller max (µs)", "{:.0f}", True),
    ("calls_s", "all calls made (s)", "{:.3f}", True),
    ("e2e_s", "first call → all received (s)", "{:.3f}", True),
    ("delivered_per_s", "delivered events/s", "{:,.0f}", False),
    ("lost", "events lost", "{:.0f}", True),
    ("duplicates", "duplicates received", "{:.0f}", True),
    ("requests", "HTTP requests", "{:.0f}", None),
    ("rss_growth_mib", "peak RSS growth (MiB)", "{:.1f}", True),
    ("rss_after_import_mib", "RSS after import (MiB)", "{:.1f}", True),
    ("import_ms", "import time (ms)", "{:.1f}", True),
    ("construct_ms", "Client() time (ms)", "{:.1f}", True),
    ("import_construct_ms", "import + Client() in the run (ms)", "{:.1f}", True),
    ("rss_base_mib", "RSS after Client() (MiB)", "{:.1f}", True),
]


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


@dataclass
class Target:
    name: str
    metric: str
    ratio_to: str  # "Segment", "best peer", or "" for an absolute bound
    bound: float
    higher_is_better: bool = False
    value: float = float("nan")
    passed: Optional[bool] = None  # None: not measured (a peer was not run)

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else "PASS" if self.passed else "FAIL"

    def describe(self) -> str:
        if not self.ratio_to:
            return f"{self.name} = {self.bound:g}"
        op = "≥" if self.higher_is_better else "≤"
        return f"{self.name} {op} {self.bound:g} x {self.ratio_to}"


def targets() -> List[Target]:
    return [
        Target("caller p50", "p50_us", "Segment", 0.2),
        Target("caller p99", "p99_us", "Segment", 0.25),
        Target("caller p99.9", "p999_us", "Segment", 0.25),
        Target("delivered events/s", "delivered_per_s", "best peer", 2.0, higher_is_better=True),
        Target("events lost (queue ≥ N)", "lost", "", 0.0),
        Target("peak RSS growth", "rss_growth_mib", "Segment", 1.0),
        Target("import time", "import_ms", "Segment", 0.7),
    ]


def summarize(
    cfgs: List[Config],
    samples: Dict[str, List[Sample]],
    imports: Dict[str, List[float]],
) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Dict[str, float]], List[Target]]:
    """Medians per configuration, klime's ratios to each peer, and the targets."""
    med: Dict[str, Dict[str, float]] = {}
    for cfg in cfgs:
        runs = samples.get(cfg.key, [])
        row = {key: median([s.metrics[key] for s in runs]) for key in runs[0].metrics} if runs else {}
        if runs:
            row["lost_max"] = max(s.metrics["lost"] for s in runs)
        row["import_ms"] = median(imports.get(cfg.sdk, []))
        med[cfg.key] = row
    ratios: Dict[str, Dict[str, float]] = {}
    if "klime" in med:
        k = med["klime"]
        for cfg in cfgs:
            if cfg.sdk == "klime":
                continue
            p = med[cfg.key]
            ratios[cfg.key] = {
                key: (k[key] / p[key] if p.get(key) else float("nan"))
                for key, _, _, better in ROWS
                if better is not None and key in k and key in p
            }
    result = targets()
    if "klime" in med:
        k = med["klime"]
        for cfg in cfgs:
            if cfg.sdk != "klime" or cfg.key in ("klime", "klime-default"):
                continue
            v = med.get(cfg.key, {})
            for metric, label in (("p50_us", "caller p50"), ("p99_us", "caller p99")):
                if cfg.src:  # a baseline: this checkout's klime, same options, not slower
                    same = med.get("klime-default", {}) if cfg.key == "klime-base-default" else k
                    mine = "klime defaults" if cfg.key == "klime-base-default" else "klime"
                    target = Target(f"{mine} {label}", metric, cfg.label, VARIANT_BOUND)
                    num, den = same.get(metric), v.get(metric)
                else:  # an option of this klime: not slower than without it
                    target = Target(f"{cfg.label}: {label}", metric, "klime q=N", VARIANT_BOUND)
                    num, den = v.get(metric), k.get(metric)
                if num and den:
                    target.value = num / den
                    target.passed = target.value <= target.bound
                result.append(target)
    if "klime" in med:
        k = med["klime"]
        seg = med.get("segment")
        peers = [med[c.key] for c in cfgs if c.sdk in TARGET_PEERS]
        for t in result:
            if t.ratio_to == "klime q=N" or t.ratio_to.startswith("klime@"):
                continue  # a klime variant, done above
            if t.metric == "lost":
                t.value = k.get("lost_max", float("nan"))
            elif t.ratio_to == "Segment":
                t.value = k[t.metric] / seg[t.metric] if seg and seg.get(t.metric) else float("nan")
            else:
                best = max((p.get(t.metric, 0.0) for p in peers), default=0.0)
                t.value = k[t.metric] / best if best else float("nan")
            if t.value == t.value:
                t.passed = t.value >= t.bound if t.higher_is_better else t.value <= t.bound
    return med, ratios, result


# --------------------------------------------------------------------------- output


def _fmt(fmt: str, value: Optional[float]) -> str:
    if value is None or value != value:
        return "n/a"
    return fmt.format(value)


def render(
    cfgs: List[Config],
    med: Dict[str, Dict[str, float]],
    ratios: Dict[str, Dict[str, float]],
    results: List[Target],
    markdown: bool,
) -> str:
    lines: List[str] = []

    def table(header: List[str], rows: List[List[str]]) -> None:
        if markdown:
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
            lines.extend("| " + " | ".join(r) + " |" for r in rows)
        else:
            widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
            for r in [header, ["-" * w for w in widths], *rows]:
                cells = (c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths)))
                lines.append("  ".join(cells))
        lines.append("")

    newline = "\n" if markdown else ""
    lines.append("Medians per configuration:" + newline)
    table(
        ["metric"] + [c.label for c in cfgs],
        [[label] + [_fmt(fmt, med[c.key].get(key)) for c in cfgs] for key, label, fmt, _ in ROWS],
    )
    if ratios:
        peers = [c for c in cfgs if c.key in ratios]
        lines.append("klime (q=N) / peer (below 1 is better for klime, except events/s):" + newline)
        table(
            ["metric"] + [c.label for c in peers],
            [
                [label.split(" (")[0]] + [_fmt("{:.2f}", ratios[c.key].get(key)) for c in peers]
                for key, label, _, better in ROWS
                if better is not None and key not in ("lost", "duplicates")
            ],
        )
    if results and "klime" in med:
        lines.append("Targets (klime q=N vs Segment q=N; best peer over all peer runs):" + newline)
        table(
            ["target", "measured", "result"],
            [
                [t.describe(), _fmt("{:.3f}" if t.ratio_to else "{:.0f}", t.value), t.verdict]
                for t in results
            ],
        )
    return "\n".join(lines)


def versions(klime11: Optional[str] = None) -> Dict[str, str]:
    from importlib import metadata

    out: Dict[str, str] = {"python": platform.python_version()}
    if klime11:
        out["klime-1.1"] = klime11
    for name in (*DISTRIBUTIONS.values(), "requests", "urllib3"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000, help="track calls per run (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per configuration (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--sdks", default=",".join(SDKS), help="subset of " + ",".join(SDKS))
    parser.add_argument("--no-defaults", action="store_true", help="skip the runs at each SDK's defaults")
    parser.add_argument("--import-probes", type=int, default=5, help="extra import-only processes per SDK")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per worker process")
    parser.add_argument("--check", action="store_true", help="exit status 1 when a target FAILs")
    parser.add_argument(
        "--spool", action="store_true", help="also run klime q=N with the durable spool on"
    )
    parser.add_argument(
        "--baseline-src",
        metavar="PATH",
        help="also run klime from another checkout's src directory (klime@base), e.g. a git worktree",
    )
    _venvs.add_klime11_options(parser)
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 1:
        parser.error("--events and --repeat must be at least 1")
    sdks = [s.strip() for s in args.sdks.split(",") if s.strip()]
    unknown = set(sdks) - set(SDKS)
    if unknown:
        parser.error(f"unknown SDKs: {', '.join(sorted(unknown))}")
    pythons: Dict[str, str] = {}
    klime11_version: Optional[str] = None
    if "klime-1.1" in sdks:
        try:
            found = _venvs.klime11(args.klime11_python, create=not args.no_create_venvs)
        except _venvs.Unavailable as exc:
            print(f"skipping klime-1.1: {exc}", file=sys.stderr)
            sdks = [s for s in sdks if s != "klime-1.1"]
        else:
            pythons["klime-1.1"] = found.python
            klime11_version = f"{found.version} ({found.python})"
    installed = versions(klime11_version)
    missing = [
        s for s in sdks if s in ("segment", "posthog") and installed[DISTRIBUTIONS[s]] == "not installed"
    ]
    if missing:
        print(f"skipping {', '.join(missing)}: not installed", file=sys.stderr)
        sdks = [s for s in sdks if s not in missing]

    n = args.events
    cfgs = configs(
        n, sdks, not args.no_defaults, spool=args.spool, baseline_src=args.baseline_src
    )
    env = _process.worker_env(os.path.join(REPO, "src"))
    # klime 1.1.0 has this project's import name: nothing of this checkout on its path
    envs = {sdk: _process.worker_env(None) if sdk == "klime-1.1" else env for sdk in sdks}

    def env_of(cfg: Config) -> Dict[str, str]:
        return _process.worker_env(os.path.abspath(cfg.src)) if cfg.src else envs[cfg.sdk]

    progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        progress(
            f"note: the machine is busy (load average {load_before[0]:.2f} on {os.cpu_count()} CPUs); "
            "absolute figures will be noisy, ratios less so"
        )
    samples: Dict[str, List[Sample]] = {c.key: [] for c in cfgs}
    imports: Dict[str, List[float]] = {s: [] for s in sdks}
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="klime-bench-") as workdir, CountingCollector() as collector:
            for sdk in sdks:  # warm-up: compile bytecode caches, fill the page cache
                run_worker("import", sdk, {}, workdir, args.timeout, envs[sdk], pythons.get(sdk))
            floor = run_worker("floor", "none", {"events": n}, workdir, args.timeout, env)
            for rep in range(args.repeat):
                order = cfgs[rep % len(cfgs) :] + cfgs[: rep % len(cfgs)]  # rotate: spread drift
                for cfg in order:
                    run_id = f"r{rep}-{cfg.key}"
                    spec = {"events": n, "url": collector.url(run_id), "options": cfg.options}
                    raw = run_worker(
                        "run", cfg.sdk, spec, workdir, args.timeout, env_of(cfg), pythons.get(cfg.sdk)
                    )
                    check_identity(cfg, raw)
                    arrived = collector.stats(run_id)
                    collector.forget(run_id)
                    sample = Sample(raw, arrived, derive(n, raw, arrived))
                    samples[cfg.key].append(sample)
                    if not cfg.src:
                        imports[cfg.sdk].append(raw["import_s"] * 1000.0)
                    m = sample.metrics
                    progress(
                        f"[{rep + 1}/{args.repeat}] {cfg.label:<18} p50 {m['p50_us']:7.1f} µs  "
                        f"p99.9 {m['p999_us']:8.0f} µs  {m['delivered_per_s']:9,.0f} ev/s  "
                        f"lost {m['lost']:.0f}  rss +{m['rss_growth_mib']:.1f} MiB"
                    )
            for _ in range(max(0, args.import_probes)):  # import-only processes, interleaved
                for sdk in sdks:
                    probe = run_worker("import", sdk, {}, workdir, args.timeout, envs[sdk], pythons.get(sdk))
                    imports[sdk].append(probe["import_s"] * 1000.0)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    load_after = os.getloadavg()

    med, ratios, results = summarize(cfgs, samples, imports)
    cpu = os.cpu_count()
    bullet = "- " if args.markdown else ""
    print(
        f"{bullet}{n:,} track calls x {args.repeat} runs per configuration; python {installed['python']}, "
        f"{platform.system()} {platform.machine()}, {cpu} CPUs, load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; {time.monotonic() - started:.0f} s"
    )
    print(bullet + "versions: " + ", ".join(f"{k} {v}" for k, v in installed.items() if k != "python"))
    print(
        f"{bullet}floor (build the event dict, append to a deque): p50 {floor['floor']['p50_us']:.2f} µs; "
        f"one json.dumps of such an event: p50 {floor['json_dumps']['p50_us']:.2f} µs\n"
    )
    print(render(cfgs, med, ratios, results, args.markdown))
    if args.json:
        report = {
            "events": n,
            "repeat": args.repeat,
            "machine": {
                "platform": platform.platform(),
                "cpus": cpu,
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "versions": installed,
            "floor": floor,
            "configs": [c.__dict__ for c in cfgs],
            "runs": {
                key: [{"worker": s.raw, "collector": s.arrived, "metrics": s.metrics} for s in runs]
                for key, runs in samples.items()
            },
            "imports_ms": imports,
            "medians": med,
            "ratios": ratios,
            "targets": [t.__dict__ | {"description": t.describe()} for t in results],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=str, allow_nan=True)
    if args.check and any(t.passed is False for t in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
