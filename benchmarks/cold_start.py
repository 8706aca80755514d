"""Cold start: this klime vs klime 1.1.0 (Klime's previous, stdlib-only SDK), side by side.

    python benchmarks/cold_start.py [--runs 20] [--lambda-runs 20] [--delays 0,50]
        [--sections process,deliver,lambda] [--markdown] [--json PATH] [--check]

Every figure is a whole fresh process (or a whole fresh Lambda sandbox), repeated, the
cases interleaved (their order rotated per round, after one untimed warm-up each that
compiles the bytecode caches); median and 90th percentile (nearest rank) are reported.

- ``process``: the wall time of ``python -c CODE`` as its parent sees it (spawn to exit):
  ``pass``; ``import klime; c = klime.Client('k', endpoint=URL)``; and klime 1.1.0's
  ``from klime import KlimeClient; KlimeClient('k', endpoint=URL)``.
- ``deliver``: the same plus one ``track`` and ``shutdown()`` to a local collector: the time
  from spawning the process to the collector having read the event, and to the process'
  exit; at each ``--delays`` round trip (the collector answers that long after a request).
- ``lambda``: a Lambda cold start on the real runtime client (awslambdaric) under the
  tests' Runtime API emulator (tests/support/lambda_emulator.py): from starting the
  sandbox to the invoker having the first invocation's response (Init plus the first
  invocation, as the invoker sees it), for ``benchmarks/_cold_lambda_app.py`` as
  ``@klime_lambda`` (invocation mode), ``@klime_lambda(after_response=True)``, klime 1.1.0
  (client at module level, ``client.flush()`` before returning) and no SDK (for scale).
  Also shown: Init alone, the first invocation alone, and its post-runtime duration
  (response to the end of the Invoke phase: billed). Each event is checked to arrive.

Interpreters (``_venvs.py``, made on demand with pip in a cache directory outside the
repository): klime 1.1.0 runs in a venv that holds only ``klime==1.1.0``; this checkout's
klime (``src`` on ``PYTHONPATH``) in a venv that holds only its runtime dependencies
(``requests``, ``urllib3``), so that neither pays for the development venv's ``.pth``
files. ``pass`` is timed in both. The Lambda runtime is this venv's interpreter (it has
awslambdaric) for every mode; the function's SDK comes first on its path, as the code of
a Lambda function (``/var/task``) does.

Targets (the issue's): klime's median import + ``Client()`` process no slower than 1.1.0's;
its median Lambda cold start no slower than 1.1.0's, in both modes, at every delay.
Exit status: 0 (targets may FAIL: ``--check`` makes a FAIL exit 1), 2 when a run broke.
Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "src")
TESTS = os.path.join(REPO, "tests")
sys.path.insert(0, HERE)

import _venvs  # noqa: E402
from _collector import CountingCollector  # noqa: E402

WRITE_KEY = "bench-write-key"
LAMBDA_APP = "_cold_lambda_app.handler"
#: The target's bound: klime / klime 1.1.0 of the same run, medians.
BOUND = 1.0


class BenchError(RuntimeError):
    """A run failed; the message says which and why."""


@dataclass
class Case:
    key: str
    label: str
    python: str
    pythonpath: Optional[str]  # None: nothing on PYTHONPATH
    code: str = ""  # for process and deliver runs
    mode: str = ""  # for Lambda runs: BENCH_COLD_MODE
    samples: Dict[str, List[float]] = field(default_factory=dict)

    def add(self, metric: str, value: float) -> None:
        self.samples.setdefault(metric, []).append(value)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least ``q`` of the samples at or below it."""
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    k = max(0, min(len(ordered) - 1, -(-round(q * 1000) * len(ordered) // 1000) - 1))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def child_env(pythonpath: Optional[str]) -> Dict[str, str]:
    """A clean environment: no SDK settings, serverless markers, proxies or import profiling."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("KLIME_", "AWS_LAMBDA_", "BENCH_COLD_"))
        and k.upper() not in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "PYTHONPATH", "PYTHONHOME")
        and k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME", "PYTHONSTARTUP", "VIRTUAL_ENV")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


# --------------------------------------------------------------------------- (a), (b): processes


def timed_process(case: Case, code: str, timeout: float) -> tuple:
    """Run ``python -c code``; (monotonic ns just before the spawn, ms spawn -> exit)."""
    env = child_env(case.pythonpath)
    start_ns = time.monotonic_ns()
    started = time.perf_counter()
    done = subprocess.run(
        [case.python, "-c", code],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    wall_ms = (time.perf_counter() - started) * 1000.0
    if done.returncode != 0:
        tail = done.stderr.decode("utf-8", "replace")[-2000:]
        raise BenchError(f"{case.label}: exit status {done.returncode}: {tail}")
    return start_ns, wall_ms


def identity(case: Case) -> str:
    """The klime version ``case`` imports (checked: 1.1.0 for klime-1.1, not 1.1.0 otherwise)."""
    code = "import klime, sys; sys.stdout.write(getattr(klime, '__version__', '?') + ' ' + klime.__file__)"
    done = subprocess.run(
        [case.python, "-c", code],
        env=child_env(case.pythonpath),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{case.label}: cannot import klime: {done.stderr[-500:]}")
    version, _, path = done.stdout.partition(" ")
    is_old = version == _venvs.KLIME11_VERSION
    if is_old != case.key.startswith("klime-1.1"):
        raise BenchError(f"{case.label}: imported klime {version} from {path}")
    return f"{version} ({path})"


def process_cases(klime_py: str, old_py: Optional[str], url: str) -> List[Case]:
    out = [Case("pass", "python -c pass", klime_py, None, code="pass")]
    out.append(
        Case(
            "klime",
            "import klime; klime.Client(...)",
            klime_py,
            SRC,
            code=f"import klime; c = klime.Client('k', endpoint={url!r})",
        )
    )
    if old_py:
        out.append(Case("pass-1.1", "python -c pass (1.1.0's venv)", old_py, None, code="pass"))
        code = f"from klime import KlimeClient; c = KlimeClient('k', endpoint={url!r})"
        out.append(Case("klime-1.1", "klime 1.1.0: import + KlimeClient(...)", old_py, None, code=code))
    return out


def deliver_cases(klime_py: str, old_py: Optional[str], delay_ms: float) -> List[Case]:
    track = "c.track('Cold Start', {'plan': 'pro'}, user_id='user_1'); c.shutdown()"
    out = [
        Case(
            f"klime@{delay_ms:g}",
            f"klime: + track + shutdown, {delay_ms:g} ms",
            klime_py,
            SRC,
            code="import klime; c = klime.Client('k', endpoint={url!r}); " + track,
        )
    ]
    if old_py:
        out.append(
            Case(
                f"klime-1.1@{delay_ms:g}",
                f"klime 1.1.0: + track + shutdown, {delay_ms:g} ms",
                old_py,
                None,
                code="from klime import KlimeClient; c = KlimeClient('k', endpoint={url!r}); " + track,
            )
        )
    return out


def run_processes(cases: List[Case], runs: int, timeout: float, progress: Callable[[str], None]) -> None:
    for case in cases:  # warm-up: bytecode caches, page cache
        timed_process(case, case.code, timeout)
    for rep in range(runs):
        shift = rep % len(cases)
        for case in cases[shift:] + cases[:shift]:
            _, wall = timed_process(case, case.code, timeout)
            case.add("wall_ms", wall)
    for case in cases:
        progress(f"process  {case.label:<40} median {median(case.samples['wall_ms']):6.1f} ms")


def run_deliveries(
    cases: List[Case],
    collector: CountingCollector,
    delay_ms: float,
    runs: int,
    timeout: float,
    progress: Callable[[str], None],
) -> None:
    for rep in range(-1, runs):  # -1: the warm-up
        shift = max(rep, 0) % len(cases)
        for case in cases[shift:] + cases[:shift]:
            run_id = f"deliver-{case.key}-{rep}-{time.monotonic_ns()}"
            collector.configure(run_id, delay=delay_ms / 1000.0)
            code = case.code.replace("{url!r}", repr(collector.url(run_id)))
            start_ns, wall = timed_process(case, code, timeout)
            stats = wait_delivered(collector, run_id, 1, 5.0)
            collector.forget(run_id)
            if stats["unique"] != 1:
                raise BenchError(f"{case.label}: {stats['unique']} of 1 event arrived")
            if rep >= 0:
                case.add("arrived_ms", (stats["last_ns"] - start_ns) / 1e6)
                case.add("wall_ms", wall)
    for case in cases:
        progress(
            f"deliver  {case.label:<40} arrived median {median(case.samples['arrived_ms']):6.1f} ms, "
            f"exit {median(case.samples['wall_ms']):6.1f} ms"
        )


def wait_delivered(collector: CountingCollector, run_id: str, n: int, limit: float) -> Dict[str, Any]:
    deadline = time.monotonic() + limit
    while True:
        stats = collector.stats(run_id)
        if stats["unique"] >= n or time.monotonic() >= deadline:
            return stats
        time.sleep(0.005)


# --------------------------------------------------------------------------- (c): Lambda


def lambda_cases(old_site: Optional[str]) -> List[Case]:
    py = sys.executable  # the runtime: this venv's interpreter, which has awslambdaric
    out = [
        Case("lambda-none", "no SDK", py, None, mode="none"),
        Case("lambda-klime", "@klime_lambda", py, SRC, mode="klime"),
        Case("lambda-klime-after", "@klime_lambda(after_response=True)", py, SRC, mode="klime-after"),
    ]
    if old_site:
        out.append(Case("lambda-klime-1.1", "klime 1.1.0 + flush()", py, old_site, mode="klime-1.1"))
    return out


def lambda_cold_start(
    case: Case, collector: CountingCollector, delay_ms: float, run_id: str
) -> Dict[str, float]:
    """One fresh sandbox: Init, then one invocation; the times (ms) and the checks."""
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    from support.lambda_emulator import LambdaEmulator

    collector.configure(run_id, delay=delay_ms / 1000.0)
    env = child_env(case.pythonpath)
    env.setdefault("PYTHONPATH", "")
    env.update({"BENCH_COLD_MODE": case.mode, "BENCH_COLD_URL": collector.url(run_id)})
    emu = LambdaEmulator(LAMBDA_APP, cwd=HERE, env=env, timeout_s=30, python=case.python)
    try:
        started = time.monotonic()
        emu.start()
        inv = emu.invoke({}, timeout=60)
        answered = time.monotonic()
        if not inv.ok:
            raise BenchError(f"{case.label}: the invocation failed: {inv.payload}\n{emu.log_tail()}")
        version = (inv.payload or {}).get("version")
        if case.mode != "none" and (version == _venvs.KLIME11_VERSION) != (case.mode == "klime-1.1"):
            raise BenchError(f"{case.label}: ran klime {version}")
        if not emu.wait_ended(inv, 30):
            raise BenchError(f"{case.label}: the first invocation never ended\n{emu.log_tail()}")
        assert emu.init_done_at is not None
        result = {
            "cold_ms": (answered - started) * 1000.0,
            "init_ms": (emu.init_done_at - started) * 1000.0,
            "invoke_ms": inv.duration * 1000.0,
            "post_ms": (inv.post_runtime or 0.0) * 1000.0,
        }
    finally:
        emu.stop()
    want = 0 if case.mode == "none" else 1
    stats = wait_delivered(collector, run_id, want, 5.0)
    collector.forget(run_id)
    if stats["unique"] != want:
        raise BenchError(f"{case.label}: {stats['unique']} of {want} events arrived")
    return result


def run_lambdas(
    cases: List[Case],
    collector: CountingCollector,
    delay_ms: float,
    runs: int,
    progress: Callable[[str], None],
) -> None:
    for rep in range(-1, runs):  # -1: the warm-up
        shift = max(rep, 0) % len(cases)
        for case in cases[shift:] + cases[:shift]:
            got = lambda_cold_start(
                case, collector, delay_ms, f"lambda-{case.key}-{rep}-{time.monotonic_ns()}"
            )
            if rep >= 0:
                for metric, value in got.items():
                    case.add(metric, value)
    for case in cases:
        progress(
            f"lambda   {case.label:<40} {delay_ms:g} ms: cold start median "
            f"{median(case.samples['cold_ms']):6.1f} ms (Init {median(case.samples['init_ms']):.1f})"
        )


# --------------------------------------------------------------------------- output


@dataclass
class Target:
    name: str
    value: float = float("nan")  # klime / klime 1.1.0
    detail: str = "not run"

    @property
    def verdict(self) -> str:
        if self.value != self.value:
            return "n/a"
        return "PASS" if self.value <= BOUND else "FAIL"


def _f(value: float, spec: str = "{:.1f}") -> str:
    return "-" if value != value else spec.format(value)


def table(headers: List[str], rows: List[List[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(headers) + " |", "|---|" + "---:|" * (len(headers) - 1)]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(headers, *rows)]
    lines = []
    for r in [headers, ["-" * w for w in widths], *rows]:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        )
    return "\n".join(lines)


def ratio(num: Optional[Case], den: Optional[Case], metric: str) -> float:
    if not num or not den:
        return float("nan")
    a, b = median(num.samples.get(metric, [])), median(den.samples.get(metric, []))
    return a / b if b > 0 else float("nan")


def report(
    process: List[Case],
    deliver: Dict[float, List[Case]],
    lambdas: Dict[float, List[Case]],
    markdown: bool,
) -> tuple:
    parts: List[str] = []
    results: List[Target] = []

    def heading(text: str) -> None:
        parts.append(("**" + text + "**" if markdown else text) + "\n")

    def by_key(cases: List[Case]) -> Dict[str, Case]:
        return {c.key: c for c in cases}

    if process:
        cases = by_key(process)
        old = cases.get("klime-1.1")
        heading("(a) A whole process: spawn to exit, ms")
        rows = []
        for c in process:
            w = c.samples["wall_ms"]
            vs = _f(ratio(c, old, "wall_ms"), "{:.2f}") if c.key == "klime" else ""
            rows.append([c.label, _f(median(w)), _f(percentile(w, 0.9)), str(len(w)), vs])
        parts.append(table(["process", "median", "p90", "runs", "klime / 1.1.0"], rows, markdown) + "\n")
        t = Target("import + Client(): klime's median process ≤ 1.1.0's")
        t.value = ratio(cases.get("klime"), old, "wall_ms")
        if old:
            t.detail = (
                f"{median(cases['klime'].samples['wall_ms']):.1f} vs {median(old.samples['wall_ms']):.1f} ms "
                f"({t.value:.2f} x)"
            )
        results.append(t)
    if deliver:
        heading("(b) + one track + shutdown(): spawn to the event read by the collector, and to exit, ms")
        rows = []
        for delay, cases in deliver.items():
            keyed = by_key(cases)
            old = keyed.get(f"klime-1.1@{delay:g}")
            for c in cases:
                a, w = c.samples["arrived_ms"], c.samples["wall_ms"]
                vs = _f(ratio(c, old, "arrived_ms"), "{:.2f}") if not c.key.startswith("klime-1.1") else ""
                rows.append(
                    [
                        c.label,
                        _f(median(a)),
                        _f(percentile(a, 0.9)),
                        _f(median(w)),
                        _f(percentile(w, 0.9)),
                        vs,
                    ]
                )
        parts.append(
            table(
                ["process", "event arrived: median", "p90", "exit: median", "p90", "arrived: klime / 1.1.0"],
                rows,
                markdown,
            )
            + "\n"
        )
    if lambdas:
        heading(
            "(c) Lambda cold start on awslambdaric: start of the sandbox to the first response "
            "(Init + first invocation, as the invoker sees it), ms"
        )
        rows = []
        for delay, cases in lambdas.items():
            keyed = by_key(cases)
            old = keyed.get("lambda-klime-1.1")
            for c in cases:
                s = c.samples
                vs = _f(ratio(c, old, "cold_ms"), "{:.2f}") if c.mode in ("klime", "klime-after") else ""
                rows.append(
                    [
                        f"{delay:g} ms: {c.label}",
                        _f(median(s["cold_ms"])),
                        _f(percentile(s["cold_ms"], 0.9)),
                        _f(median(s["init_ms"])),
                        _f(median(s["invoke_ms"])),
                        _f(median(s["post_ms"])),
                        str(len(s["cold_ms"])),
                        vs,
                    ]
                )
            for mode, label in (
                ("lambda-klime", "@klime_lambda"),
                ("lambda-klime-after", "after_response=True"),
            ):
                t = Target(f"Lambda cold start, {label}, {delay:g} ms: klime's median ≤ 1.1.0's")
                t.value = ratio(keyed.get(mode), old, "cold_ms")
                if old and mode in keyed:
                    t.detail = (
                        f"{median(keyed[mode].samples['cold_ms']):.1f} vs "
                        f"{median(old.samples['cold_ms']):.1f} ms "
                        f"({t.value:.2f} x)"
                    )
                results.append(t)
        parts.append(
            table(
                [
                    "round trip: function",
                    "cold start: median",
                    "p90",
                    "Init: median",
                    "first invocation: median",
                    "post-runtime: median",
                    "runs",
                    "klime / 1.1.0",
                ],
                rows,
                markdown,
            )
            + "\n"
        )
    heading("Targets (issue 19, item 6)")
    parts.append(
        table(["target", "measured", "result"], [[t.name, t.detail, t.verdict] for t in results], markdown)
    )
    return "\n".join(parts), results


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="fresh processes per case (default 20)")
    parser.add_argument("--lambda-runs", type=int, help="fresh sandboxes per mode (default: --runs)")
    parser.add_argument("--delays", default="0,50", help="collector round trips in ms for deliver and lambda")
    parser.add_argument(
        "--sections",
        default="process,deliver,lambda",
        help="what to measure (default process,deliver,lambda)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    parser.add_argument("--json", metavar="PATH", help="also write every sample to this JSON file")
    parser.add_argument("--check", action="store_true", help="exit status 1 when a target FAILs")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds allowed per process")
    parser.add_argument(
        "--klime11-python", metavar="PATH", help="klime 1.1.0's interpreter (default: its cached venv)"
    )
    parser.add_argument(
        "--no-create-venvs", action="store_true", help="do not create missing venvs: skip klime 1.1.0 instead"
    )
    args = parser.parse_args(argv)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - {"process", "deliver", "lambda"}:
        parser.error(f"unknown sections: {sorted(sections - {'process', 'deliver', 'lambda'})}")
    if args.runs < 1 or (args.lambda_runs is not None and args.lambda_runs < 1):
        parser.error("--runs and --lambda-runs must be at least 1")
    try:
        delays = [float(x) for x in args.delays.split(",") if x.strip()]
    except ValueError:
        parser.error("--delays: comma-separated numbers")
    lambda_runs = args.lambda_runs or args.runs
    progress: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    create = not args.no_create_venvs

    notes: List[str] = []
    try:
        lean = _venvs.klime_deps(create=create)
        klime_py = lean.python
        notes.append(
            f"klime: this checkout's src, in a venv with only requests {lean.version} and urllib3 "
            f"({lean.where})"
        )
    except _venvs.Unavailable as exc:
        klime_py = sys.executable
        notes.append(
            f"klime: this checkout's src in the development venv ({exc}); its .pth files slow every start"
        )
        progress(f"note: no lean venv for klime ({exc}); using {sys.executable}")
    old_py: Optional[str] = None
    old_site: Optional[str] = None
    try:
        old = _venvs.klime11(args.klime11_python, create=create)
        old_py = old.python
        notes.append(f"klime 1.1.0: {old.where}")
    except _venvs.Unavailable as exc:
        print(f"skipping klime-1.1: {exc}", file=sys.stderr)
        notes.append(f"klime 1.1.0 skipped: {exc}")

    load_before = os.getloadavg()
    started = time.monotonic()
    process: List[Case] = []
    deliver: Dict[float, List[Case]] = {}
    lambdas: Dict[float, List[Case]] = {}
    versions: Dict[str, str] = {}
    try:
        with CountingCollector() as collector:
            probe_url = collector.url("never-posted")
            checked = process_cases(klime_py, old_py, probe_url)
            for case in checked:
                if case.key in ("klime", "klime-1.1"):
                    versions[case.key] = identity(case)
            if old_py:
                old_site = os.path.dirname(
                    os.path.dirname(versions["klime-1.1"].split("(", 1)[1].rstrip(")"))
                )
            if "process" in sections:
                process = checked
                run_processes(process, args.runs, args.timeout, progress)
            for delay in delays:
                if "deliver" in sections:
                    deliver[delay] = deliver_cases(klime_py, old_py, delay)
                    run_deliveries(deliver[delay], collector, delay, args.runs, args.timeout, progress)
                if "lambda" in sections:
                    lambdas[delay] = lambda_cases(old_site)
                    run_lambdas(lambdas[delay], collector, delay, lambda_runs, progress)
    except (BenchError, subprocess.TimeoutExpired) as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    load_after = os.getloadavg()

    text, results = report(process, deliver, lambdas, args.markdown)
    bullet = "- " if args.markdown else ""
    print(
        f"{bullet}{args.runs} fresh processes per case, {lambda_runs} fresh sandboxes per Lambda mode; "
        f"python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
        f"{time.monotonic() - started:.0f} s"
    )
    print(bullet + "klime imported: " + "; ".join(f"{k} {v}" for k, v in versions.items()))
    for note in notes:
        print(bullet + note)
    print()
    print(text)
    if args.json:
        every = (
            process + [c for cs in deliver.values() for c in cs] + [c for cs in lambdas.values() for c in cs]
        )
        data = {
            "runs": args.runs,
            "lambda_runs": lambda_runs,
            "delays_ms": delays,
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": load_after,
            },
            "versions": versions,
            "notes": notes,
            "cases": [
                {
                    "key": c.key,
                    "label": c.label,
                    "python": c.python,
                    "samples": c.samples,
                    "medians": {m: median(v) for m, v in c.samples.items()},
                    "p90": {m: percentile(v, 0.9) for m, v in c.samples.items()},
                }
                for c in every
            ],
            "targets": [{"target": t.name, "ratio": t.value, "verdict": t.verdict} for t in results],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, allow_nan=True)
    if args.check and any(t.verdict == "FAIL" for t in results):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
