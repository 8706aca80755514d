"""The benchmark harness works (``benchmarks/``). No timing is asserted here: the figures
themselves come from ``make bench`` on a quiet machine (docs/performance.md)."""

from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import _venvs  # noqa: E402
from _collector import CountingCollector  # noqa: E402


@pytest.fixture(scope="module")
def klime11_venv() -> str | None:
    """klime 1.1.0's venv (benchmarks/_venvs.py), made once here if the package index can
    be reached; the harnesses then run with ``--no-create-venvs``. None when it could not be
    made: the harness must then skip that peer and say why."""
    try:
        return _venvs.klime11().python
    except _venvs.Unavailable:
        return None


def _skipped_11(stderr: str) -> bool:
    return "skipping klime-1.1: " in stderr


def _post(port: int, path: str, body: bytes, headers: dict) -> tuple:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_collector_counts_each_sdks_wire_format_by_event_id() -> None:
    """klime/Segment (``/v1/batch``, messageId) and PostHog (``/batch/``, uuid, gzip) are
    counted per run; a repeated id is a duplicate, an unknown path is not an event."""
    with CountingCollector() as collector:
        plain = json.dumps({"batch": [{"messageId": "a"}, {"messageId": "b"}]}).encode()
        status, reply = _post(collector.port, "/r1/v1/batch", plain, {"Content-Type": "application/json"})
        assert (status, reply["accepted"]) == (200, 2)
        again = json.dumps({"batch": [{"messageId": "b"}]}).encode()
        assert _post(collector.port, "/r1/v1/batch", again, {})[0] == 200
        zipped = gzip.compress(json.dumps({"batch": [{"uuid": "u1"}], "api_key": "k"}).encode())
        assert _post(collector.port, "/r2/batch/", zipped, {"Content-Encoding": "gzip"})[0] == 200
        assert _post(collector.port, "/r2/flags/", b"{}", {})[0] == 404

        first, second = collector.stats("r1"), collector.stats("r2")
    assert (first["requests"], first["events"], first["unique"], first["duplicates"]) == (2, 3, 2, 1)
    assert first["first_ns"] <= first["last_ns"]
    assert (second["unique"], second["other_requests"]) == (1, 1)


@pytest.mark.timeout(420)
def test_run_py_measures_every_sdk_on_a_small_workload(tmp_path: Path, klime11_venv: str | None) -> None:
    """``benchmarks/run.py`` with 200 events runs each SDK in its own process and reports
    figures, ratios and targets; klime (queue >= N) delivers every event exactly once;
    klime 1.1.0 runs in its own venv (or, without one, is skipped with the reason)."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--events",
            "200",
            "--repeat",
            "1",
            "--import-probes",
            "0",
            "--no-create-venvs",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Targets" in proc.stdout
    report = json.loads(out.read_text())
    keys = {c["key"] for c in report["configs"]}
    assert {"klime", "klime-default"} <= keys
    for key, runs in report["runs"].items():
        assert len(runs) == 1, key
        metrics = runs[0]["metrics"]
        assert metrics["delivered"] + metrics["lost"] == 200, key
        assert metrics["duplicates"] == 0, key
        assert runs[0]["collector"]["bad_requests"] == 0, key
    klime = report["runs"]["klime"][0]
    assert klime["metrics"]["lost"] == 0
    assert klime["worker"]["sdk_stats"]["sent"] == 200
    assert set(klime["collector"]["paths"]) == {"v1/batch"}
    assert klime["collector"]["unique"] == klime["collector"]["events"] == 200
    assert len(report["targets"]) == 7
    if klime11_venv is None:
        assert _skipped_11(proc.stderr), proc.stderr
    else:
        assert {"klime-1.1", "klime-1.1-default"} <= keys
        old = report["runs"]["klime-1.1"][0]
        assert old["worker"]["sdk_version"] == "1.1.0"
        assert old["metrics"]["lost"] == 0 and old["worker"]["on_error_events"] == 0
        assert "klime 1.1.0 q=200" in proc.stdout
    peers = {c["sdk"] for c in report["configs"]} >= {"segment", "posthog"}
    for target in report["targets"]:  # without a peer (not installable here), n/a
        assert isinstance(target["passed"], bool) or (not peers and target["passed"] is None)


def test_collector_delays_each_connection_independently_and_can_reject() -> None:
    """A run configured with a delay answers each request after it, concurrent requests on
    their own connections in parallel (the peak in flight counts them); a run configured
    with 503 rejects every batch and counts none of its ids as delivered."""
    import threading

    with CountingCollector() as collector:
        collector.configure("slow", delay=0.5)
        collector.configure("down", status=503)
        gate = threading.Barrier(3)
        statuses: list = []

        def post(k: int) -> None:
            body = json.dumps({"batch": [{"messageId": f"m{k}"}]}).encode()
            gate.wait()
            statuses.append(_post(collector.port, "/slow/v1/batch", body, {})[0])

        threads = [threading.Thread(target=post, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        conn = http.client.HTTPConnection("127.0.0.1", collector.port, timeout=10)
        try:
            conn.request("POST", "/down/v1/batch", body=json.dumps({"batch": [{"messageId": "x"}]}).encode())
            response = conn.getresponse()
            down_status = response.status
            response.read()
        finally:
            conn.close()
        # each span is recorded once its answer is written: the client may read the answer first
        deadline = time.monotonic() + 10
        while len(collector.spans("slow")) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        slow, down = collector.stats("slow"), collector.stats("down")
        spans = collector.spans("slow")
    assert statuses == [200, 200, 200]
    assert (slow["unique"], slow["connections"], slow["peak_in_flight"]) == (3, 3, 3)
    assert len(spans) == 3 and all(answered >= arrived for arrived, answered, _ in spans)
    assert down_status == 503
    assert (down["requests"], down["rejected"], down["rejected_events"], down["unique"]) == (1, 1, 1, 0)


@pytest.mark.timeout(420)
def test_roundtrip_py_runs_each_case_on_a_tiny_workload(tmp_path: Path, klime11_venv: str | None) -> None:
    """``benchmarks/roundtrip.py --quick`` (200 events per run at 0 and 5 ms, the burst, the
    exit case and the 503 case) runs every SDK (klime 1.1.0 in its own venv, or skipped with
    the reason), and a baseline klime, each in its own process and reports each figure;
    nothing about the figures themselves is asserted."""
    out = tmp_path / "roundtrip.json"
    src = BENCH.parent / "src"
    command = [
        sys.executable,
        str(BENCH / "roundtrip.py"),
        "--quick",
        "--baseline-src",
        str(src),
        "--no-create-venvs",
    ]
    proc = subprocess.run(
        [*command, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in ("Paced runs", "Burst:", "Exit:", "503 to everything", "Targets"):
        assert heading in proc.stdout, heading
    report = json.loads(out.read_text())
    assert report["broken"] == []
    sdks = set(report["plan"]["sdks"])
    assert {"klime", "klime-base"} <= sdks
    assert ("klime-1.1" in sdks) == (klime11_venv is not None)
    if klime11_venv is None:
        assert _skipped_11(proc.stderr), proc.stderr
    runs = report["runs"]
    cells = {(r["case"], r["sdk"], r["delay_ms"]) for r in runs}
    for sdk in sdks:
        assert {("paced", sdk, 0.0), ("paced", sdk, 5.0), ("exit", sdk, 5.0)} <= cells, sdk
        assert {("burst", sdk, 0.0), ("burst", sdk, 5.0)} <= cells, sdk
    assert {("fault", "klime", 5.0), ("fault", "klime-base", 5.0)} <= cells
    for run in runs:
        m = run["metrics"]
        assert m["tracked"] == run["worker"]["events"] == 200, run["sdk"]
        assert m["delivered"] + m["lost"] == m["tracked"], run["sdk"]
        assert isinstance(m["stderr_lines"], int) and m["duplicates"] >= 0
        assert run["collector"]["bad_requests"] == 0
        if run["case"] == "pacer":
            assert run["sdk"] == "none" and m["requests"] == 0
        elif run["case"] == "burst":
            assert m["requests"] >= 1 and m["peak_in_flight"] >= 1
        elif run["case"] != "exit":
            assert m["requests"] >= 1 and m["peak_in_flight"] >= 1
            assert m["p50_us"] > 0 and m["cpu_s"] > 0
        if run["case"] == "fault":
            assert m["delivered"] == 0 and m["rejected"] == m["requests"]
        if run["case"] == "burst":
            assert m["lost"] == 0 and m["max_us"] >= m["p99_us"] >= m["p50_us"] > 0, run["sdk"]
            assert m["calls_s"] > 0 and m["end_s"] >= 0
        if run["sdk"] == "klime-1.1":
            assert run["worker"]["klime_version"] == "1.1.0"
    assert len(report["targets"]) == 8


@pytest.mark.timeout(420)
def test_cold_start_py_measures_each_section_with_one_run(tmp_path: Path, klime11_venv: str | None) -> None:
    """``benchmarks/cold_start.py`` with one run per case: whole processes (pass, import +
    Client), one event delivered from a fresh process, and a Lambda cold start on the real
    awslambdaric in each mode; every event arrives (the harness checks it, or exits 2), and
    each target is decided when klime 1.1.0 ran (else it is skipped with the reason)."""
    out = tmp_path / "cold.json"
    command = [sys.executable, str(BENCH / "cold_start.py"), "--runs", "1", "--delays", "0"]
    proc = subprocess.run(
        [*command, "--no-create-venvs", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for heading in ("(a) A whole process", "(b) + one track", "(c) Lambda cold start", "Targets"):
        assert heading in proc.stdout, heading
    report = json.loads(out.read_text())
    cases = {c["key"]: c for c in report["cases"]}
    expected = {"pass", "klime", "klime@0", "lambda-none", "lambda-klime", "lambda-klime-after"}
    if klime11_venv is not None:
        expected |= {"pass-1.1", "klime-1.1", "klime-1.1@0", "lambda-klime-1.1"}
    else:
        assert _skipped_11(proc.stderr), proc.stderr
    assert set(cases) == expected
    for key, case in cases.items():
        assert case["samples"], key
        for metric, values in case["samples"].items():
            assert len(values) == 1 and values[0] > 0, (key, metric)
    assert cases["klime@0"]["samples"]["arrived_ms"][0] < cases["klime@0"]["samples"]["wall_ms"][0] + 1000
    assert set(cases["lambda-klime"]["samples"]) == {"cold_ms", "init_ms", "invoke_ms", "post_ms"}
    verdicts = [t["verdict"] for t in report["targets"]]
    assert len(verdicts) == 3
    assert all(v in ("PASS", "FAIL") for v in verdicts) if klime11_venv else all(v == "n/a" for v in verdicts)
    assert report["versions"]["klime"].split()[0] != "1.1.0"


def test_sender_cpu_py_compares_two_checkouts_per_request() -> None:
    """``benchmarks/sender_cpu.py`` with this checkout as its own baseline: one worker each,
    every request answered, CPU and wall time per request positive and their ratio printed."""
    src = str(BENCH.parent / "src")
    command = [sys.executable, str(BENCH / "sender_cpu.py"), "--baseline-src", src, "--requests", "50"]
    proc = subprocess.run([*command, "--repeat", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("klime ", "klime-base "))]
    rows = [r for r in rows if len(r) == 3]  # the table's rows: name, CPU, wall
    assert [r[0] for r in rows] == ["klime", "klime-base"]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
    assert "klime / klime-base, CPU per request: " in proc.stdout
