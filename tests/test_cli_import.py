"""``klime import`` (klime.cli._import): exit statuses, output, rejects and dry runs in
process; a subprocess import killed with SIGKILL three times and resumed from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from conftest import WRITE_KEY
from klime.cli import main
from klime.devserver import Collector, Fault


def events(n: int) -> List[Dict[str, Any]]:
    return [
        {
            "type": "track",
            "event": "Order",
            "userId": f"u{i % 50}",
            "timestamp": f"2023-{1 + i % 12:02d}-01T00:00:00Z",
            "properties": {"n": i},
        }
        for i in range(n)
    ]


def ndjson(path: Path, rows: List[Any]) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def keyed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)


def test_import_sends_everything_and_exits_0(
    tmp_path: Path, collector: Collector, keyed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ndjson(tmp_path / "e.ndjson", events(450))
    assert main(["import", path, "--endpoint", collector.url, "--json"]) == 0
    assert len(set(collector.message_ids())) == 450
    out, err = capsys.readouterr()
    assert json.loads(out)["sent"] == 450
    assert "450 sent" in err and WRITE_KEY not in err


def test_the_endpoint_comes_from_the_environment(
    tmp_path: Path, collector: Collector, keyed: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    assert main(["import", ndjson(tmp_path / "e.ndjson", events(3)), "--quiet"]) == 0
    assert len(collector.message_ids()) == 3


def test_malformed_lines_are_named_and_exit_3(
    tmp_path: Path, collector: Collector, keyed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ndjson(tmp_path / "e.ndjson", [*events(2), "{oops", *events(1)])
    assert main(["import", path, "--endpoint", collector.url]) == 3
    err = capsys.readouterr().err
    assert f"{path}:3: not valid JSON" in err and "1 malformed lines skipped" in err
    assert len(collector.message_ids()) == 3


def test_rejections_are_written_and_exit_1(
    tmp_path: Path, collector: Collector, keyed: None, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ndjson(tmp_path / "e.ndjson", events(5))
    rejects = tmp_path / "rejects.ndjson"
    collector.respond(Fault.partial(1, 3))
    assert main(["import", path, "--endpoint", collector.url, "--rejects", str(rejects)]) == 1
    kept = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [e["properties"]["n"] for e in kept] == [1, 3]
    assert all(e["_rejected"]["code"] == "injected_failure" for e in kept)
    assert f"2 events rejected by the server, written to {rejects}" in capsys.readouterr().err


def test_dry_run_needs_no_key_and_sends_nothing(
    tmp_path: Path, collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ndjson(tmp_path / "e.ndjson", events(20))
    assert main(["import", path, "--endpoint", collector.url, "--dry-run", "--format", "klime"]) == 0
    assert collector.requests() == []
    assert "20 events, 20 checked" in capsys.readouterr().err


def test_usage_errors_exit_2(
    tmp_path: Path, collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    path = ndjson(tmp_path / "e.ndjson", events(1))
    assert main(["import", path, "--endpoint", collector.url]) == 2  # no write key
    assert "write key" in capsys.readouterr().err
    missing = str(tmp_path / "missing.ndjson")
    assert main(["import", missing, "--write-key", WRITE_KEY, "--endpoint", collector.url]) == 2
    assert "cannot read" in capsys.readouterr().err


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def test_killed_three_times_and_resumed_every_event_arrives(tmp_path: Path, src_env: Dict[str, str]) -> None:
    total, concurrency = 20_000, 4
    window = concurrency * 100
    path = ndjson(tmp_path / "history.ndjson", events(total))
    ckpt = tmp_path / "import.ckpt"
    with Collector(write_key=WRITE_KEY) as collector:
        collector.set_mode(Fault.slow(0.03))  # a round trip: about 13,000 events/s at most
        env = dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url)
        command = [
            sys.executable,
            "-m",
            "klime.cli",
            "import",
            path,
            "--checkpoint",
            str(ckpt),
            "--concurrency",
            str(concurrency),
            "--quiet",
        ]
        kills = 0
        for target in (3_000, 8_000, 13_000):
            proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                assert _wait(
                    lambda t=target, p=proc: len(collector.message_ids()) >= t or p.poll() is not None, 60
                )
                assert proc.poll() is None, "the import ended before it could be killed"
                os.kill(proc.pid, signal.SIGKILL)
                kills += 1
            finally:
                proc.kill()
                proc.wait(10)
                assert proc.stderr is not None
                proc.stderr.close()
            assert ckpt.exists()
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert "resumed from the checkpoint" in done.stderr
        ids = collector.message_ids()
    assert len(set(ids)) == total
    duplicates = len(ids) - total
    print(f"re-sent after {kills} kills: {duplicates} (window {window})")
    assert duplicates <= kills * window, f"{duplicates} re-sent events for {kills} kills"
    assert json.loads(ckpt.read_text())["inputs"][0]["done"] is True
