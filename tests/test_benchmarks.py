"""The benchmark harness works (``benchmarks/``). No timing is asserted here: the figures
themselves come from ``make bench`` on a quiet machine (docs/performance.md)."""

from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from _collector import CountingCollector  # noqa: E402


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


@pytest.mark.timeout(120)
def test_run_py_measures_every_sdk_on_a_small_workload(tmp_path: Path) -> None:
    """``benchmarks/run.py`` with 200 events runs each SDK in its own process and reports
    figures, ratios and targets; klime (queue >= N) delivers every event exactly once."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "run.py"),
            "--events", "200",
            "--repeat", "1",
            "--import-probes", "0",
            "--json", str(out),
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
    assert all(isinstance(t["passed"], bool) for t in report["targets"])
