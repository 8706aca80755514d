"""Tests for the ``klime`` command (klime.cli), against the real local collector.

Most run ``main([...])`` in-process; a few run ``python -m klime.cli`` (and the ``klime``
console script when it is installed) as real processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

import klime
from conftest import WRITE_KEY, wait_until
from klime.cli import main, parse_value
from klime.devserver import Fault
from klime.spool import inspect


@pytest.fixture
def env(monkeypatch, collector):
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("pro", "pro"),
        ("3", 3),
        ("2.5", 2.5),
        ("true", True),
        ("null", None),
        ('["a", "b"]', ["a", "b"]),
        ('{"k": 1}', {"k": 1}),
        ('"007"', "007"),
        ("007", "007"),
        ("", ""),
        ("Acme Inc", "Acme Inc"),
        ("a=b", "a=b"),
    ],
)
def test_values_are_json_when_they_parse(text, value):
    assert parse_value(text) == value


def test_track(env, collector, capsys):
    code = main(
        [
            "track",
            "Signup",
            "--user-id",
            "u1",
            "--group-id",
            "org_1",
            "--prop",
            "plan=pro",
            "-p",
            "seats=3",
            "--prop",
            'tags=["a","b"]',
            "--prop",
            'zip="02134"',
            "--prop",
            "note=x=y",
        ]
    )
    assert code == 0
    assert capsys.readouterr().out == "ok: 1 accepted, 0 failed (HTTP 200)\n"
    (event,) = collector.events()
    assert event["type"] == "track" and event["event"] == "Signup"
    assert event["userId"] == "u1" and event["groupId"] == "org_1"
    assert event["properties"] == {
        "plan": "pro",
        "seats": 3,
        "tags": ["a", "b"],
        "zip": "02134",
        "note": "x=y",
    }


def test_identify_and_group(env, collector, capsys):
    assert main(["identify", "u1", "--trait", "email=ada@example.com", "-t", "vip=true"]) == 0
    assert main(["group", "org_1", "--user-id", "u1", "--trait", "name=Acme Inc"]) == 0
    assert main(["group", "org_2"]) == 0
    identify, group, link = collector.events()
    assert identify["type"] == "identify" and identify["traits"] == {"email": "ada@example.com", "vip": True}
    assert group["groupId"] == "org_1" and group["userId"] == "u1" and group["traits"] == {"name": "Acme Inc"}
    assert link["groupId"] == "org_2" and "userId" not in link and "traits" not in link
    assert capsys.readouterr().out.count("ok: 1 accepted") == 3


def test_options_instead_of_environment_before_or_after_the_command(collector, capsys):
    assert main(["--write-key", WRITE_KEY, "--endpoint", collector.url, "track", "A", "--user-id", "u"]) == 0
    assert main(["track", "B", "--user-id", "u", "--write-key", WRITE_KEY, "--endpoint", collector.url]) == 0
    assert [e["event"] for e in collector.events()] == ["A", "B"]


def test_json_output(env, collector, capsys):
    assert main(["--json", "track", "A", "--user-id", "u"]) == 0
    assert main(["identify", "u", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = '{"accepted": 1, "errors": [], "failed": 0, "status": "ok", "status_code": 200}'
    assert lines == [expected, expected]


def test_send_failure_exits_1_without_the_write_key(monkeypatch, collector, capsys):
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    secret = "wrong-secret-write-key"
    assert main(["track", "A", "--user-id", "u", "--write-key", secret]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("klime: send failed (HTTP 401): ")
    assert secret not in captured.err


def test_partial_failure_exits_1(env, collector, capsys):
    collector.respond(Fault.partial(0))
    assert main(["--json", "track", "A", "--user-id", "u"]) == 1
    err = capsys.readouterr().err
    assert '"status_code": 200' in err and '"failed": 1' in err


def test_timeout_bounds_retries(env, collector, capsys):
    collector.set_mode(Fault.status_code(503))
    assert main(["track", "A", "--user-id", "u", "--timeout", "0.5"]) == 1
    assert "send failed (HTTP 503)" in capsys.readouterr().err
    assert len(collector.requests()) >= 1


def test_verbose_logs_to_stderr(env, collector, capsys):
    collector.respond(Fault.retry(429, retry_after="0"))
    assert main(["track", "A", "--user-id", "u", "-v"]) == 0
    err = capsys.readouterr().err
    assert "klime: " in err and "429" in err and WRITE_KEY not in err
    assert not logging.getLogger("klime").handlers[1:]  # the CLI's handler is gone again


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["track", "A"], "track needs a user_id or a group_id"),
        (["track", "", "--user-id", "u"], "event"),
        (["identify", ""], "user_id"),
    ],
)
def test_bad_input_exits_2(env, collector, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert collector.requests() == []


def test_missing_write_key_exits_2(collector, capsys):
    assert main(["track", "A", "--user-id", "u", "--endpoint", collector.url]) == 2
    assert "KLIME_WRITE_KEY" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["track", "A", "--prop", "novalue"],
        ["track", "A", "--prop", "=v"],
        ["track", "--timeout", "-1"],
        ["nope"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: klime" in capsys.readouterr().err


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: klime" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["track", "identify", "group", "listen", "--write-key", "KLIME_WRITE_KEY"]),
        (["track"], ["EVENT", "--user-id", "--group-id", "--prop KEY=VALUE", "--timeout", "--json"]),
        (["identify"], ["USER_ID", "--trait KEY=VALUE", "--endpoint"]),
        (["group"], ["GROUP_ID", "--user-id", "--trait KEY=VALUE"]),
        (["listen"], ["--port", "--host", "--write-key", "--fail", "--quiet"]),
    ],
)
def test_help(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main([*argv, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: klime {' '.join(argv)}".rstrip())
    for word in expected:
        assert word in out


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"klime {klime.__version__}"


# --------------------------------------------------------------------------- processes


def commands() -> List[List[str]]:
    found = [[sys.executable, "-m", "klime.cli"]]
    script = shutil.which("klime", path=str(Path(sys.executable).parent))
    if script:
        found.append([script])
    return found


@pytest.mark.parametrize("command", commands(), ids=lambda c: "console-script" if len(c) == 1 else "python-m")
def test_as_a_process(command, collector, src_env):
    env = dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url)
    ok = subprocess.run(
        [*command, "track", "Signup", "--user-id", "u1", "--prop", "plan=pro"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "ok: 1 accepted, 0 failed (HTTP 200)\n", "")
    failed = subprocess.run(
        [*command, "identify", "u1"],
        env=dict(env, KLIME_WRITE_KEY="bad-key"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 1 and "HTTP 401" in failed.stderr
    assert [e["event"] for e in collector.events()] == ["Signup"]


class Lines:
    """Collects a process's output lines in a thread, so tests wait with deadlines."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: List[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def join(self) -> None:
        self._thread.join(10)


@pytest.fixture
def listen(src_env: Dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "klime.cli", "listen", "--port", "0", "--write-key", WRITE_KEY],
        env=dict(src_env, PYTHONUNBUFFERED="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()


def test_listen_prints_arrivals_and_a_summary(listen):
    lines = Lines(listen)
    assert wait_until(lambda: any("listening on" in line for line in lines.lines), timeout=30), lines.text()
    url = lines.lines[0].rsplit(" ", 1)[-1]
    assert url.startswith("http://127.0.0.1:")

    with klime.Client(WRITE_KEY, endpoint=url, transport="blocking") as client:
        client.track("Signup", {"plan": "pro"}, user_id="u1")
        client.identify("u1", {"email": "ada@example.com"})
        client.group("org_1", {"name": "Acme"}, user_id="u1")
    with klime.Client("another-key", endpoint=url) as client:  # refused: --write-key
        with pytest.raises(klime.SendError):
            client.track_sync("Nope", user_id="u1")

    assert wait_until(lambda: "-> 401" in lines.text(), timeout=30), lines.text()
    listen.send_signal(signal.SIGTERM)
    assert listen.wait(30) == 0
    lines.join()
    text = lines.text()
    assert 'track     "Signup"  user=u1  {"plan": "pro"}' in text
    assert 'identify  user=u1  {"email": "ada@example.com"}' in text
    assert 'group     org_1  user=u1  {"name": "Acme"}' in text
    assert "Nope" not in text
    assert lines.lines[-1] == "3 events arrived: 1 track, 1 identify, 1 group"


def test_listen_port_in_use(listen, src_env):
    lines = Lines(listen)
    assert wait_until(lambda: any("listening on" in line for line in lines.lines), timeout=30), lines.text()
    port = lines.lines[0].rsplit(":", 1)[-1]
    busy = subprocess.run(
        [sys.executable, "-m", "klime.cli", "listen", "--port", port],
        env=src_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert busy.returncode == 1 and "cannot listen" in busy.stderr


# --------------------------------------------------------------------------- klime spool


def _spooled(directory: Path, count: int, *, keep_open: bool = False):
    """``count`` track events spooled by an owner that is then gone (closed), or that stays
    alive (``keep_open``: returned, the caller closes it). Returns (messageIds, live spool)."""
    from klime._events import encode_track, message_id
    from klime.spool import Spool

    spool = Spool.open(directory)
    events = [encode_track("Spooled", {"n": i}, f"user-{i}", None) for i in range(count)]
    spool.append(events)
    if keep_open:
        return [message_id(e) for e in events], spool
    spool.close()
    return [message_id(e) for e in events], None


def test_spool_shows_counts_bytes_age_and_owners(tmp_path, capsys):
    directory = tmp_path / "spool"
    _ids, live = _spooled(directory, 3, keep_open=True)
    try:
        _spooled(directory, 2)
        assert main(["spool", str(directory)]) == 0
    finally:
        live.close()
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"{directory}: 5 events, ") and lines[0].endswith(" ago")
    assert "owners: 1 alive, 1 dead" in out
    assert f"alive  pid {os.getpid()} on " in out and "3 events" in out and "2 events" in out
    assert "adopted by the app's next live process" in out


def test_spool_json_and_empty(tmp_path, capsys):
    directory = tmp_path / "spool"
    directory.mkdir()
    assert main(["spool", str(directory)]) == 0
    assert capsys.readouterr().out == f"{directory}: empty\n"
    _spooled(directory, 4)
    assert main(["spool", str(directory), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["count"] == 4 and stats["owners"][0]["alive"] is False and stats["owners"][0]["count"] == 4


def test_spool_send_delivers_dead_owners_events_and_leaves_live_ones(env, collector, tmp_path, capsys):
    directory = tmp_path / "spool"
    dead_ids, _ = _spooled(directory, 150)
    _live_ids, live = _spooled(directory, 7, keep_open=True)
    try:
        assert main(["spool", str(directory), "--send"]) == 0
    finally:
        live.close()
    out = capsys.readouterr().out
    assert "sent 150 events in 2 requests" in out
    assert f"7 events belong to live processes (pid {os.getpid()}) and were left to them" in out
    assert sorted(collector.message_ids()) == sorted(dead_ids)
    assert inspect(directory).count == 7  # the live owner's, now dead too (closed)


def test_spool_send_reports_and_deletes_permanent_rejections(env, collector, tmp_path, capsys):
    directory = tmp_path / "spool"
    ids, _ = _spooled(directory, 5)
    collector.respond(Fault.partial(1, 3))
    assert main(["spool", str(directory), "--send"]) == 1
    out = capsys.readouterr().out
    assert "sent 3 events in 1 request" in out and "rejected 2 events (deleted from the spool):" in out
    assert f'  {ids[1]}  track "Spooled"  (HTTP 200: ' in out and ids[3] in out
    assert sorted(collector.message_ids()) == sorted(ids[i] for i in (0, 2, 4))
    _spooled(directory, 2)
    collector.respond(Fault.status_code(400))
    assert main(["--json", "spool", str(directory), "--send"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert (report["sent"], len(report["rejected"]), report["left"]) == (0, 2, 0)
    assert report["rejected"][0]["status_code"] == 400
    assert inspect(directory).count == 0


def test_spool_send_keeps_events_on_a_transient_failure(env, collector, tmp_path, capsys):
    directory = tmp_path / "spool"
    ids, _ = _spooled(directory, 30)
    collector.set_mode(Fault.status_code(503))
    assert main(["spool", str(directory), "--send", "--timeout", "0.5"]) == 1
    out = capsys.readouterr().out
    assert "sent 0 events" in out and "left 30 events in the spool: " in out and "503" in out
    stats = inspect(directory)
    assert stats.count == 30 and stats.owners[0].alive is False
    collector.set_mode(None)
    assert main(["spool", str(directory), "--send"]) == 0
    assert sorted(set(collector.message_ids())) == sorted(ids)


def test_spool_send_with_a_refused_write_key_deletes_nothing(monkeypatch, collector, tmp_path, capsys):
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    directory = tmp_path / "spool"
    _spooled(directory, 3)
    secret = "not-the-right-write-key"
    assert main(["spool", str(directory), "--send", "--write-key", secret]) == 1
    captured = capsys.readouterr()
    assert "left 3 events in the spool: " in captured.out and "check the write key" in captured.out
    assert secret not in captured.out + captured.err
    assert inspect(directory).count == 3


def test_spool_send_needs_a_write_key(collector, tmp_path, capsys):
    directory = tmp_path / "spool"
    _spooled(directory, 1)
    assert main(["spool", str(directory), "--send", "--endpoint", collector.url]) == 2
    assert "KLIME_WRITE_KEY" in capsys.readouterr().err
    assert collector.requests() == []


def test_spool_clear_needs_yes(tmp_path, capsys):
    directory = tmp_path / "spool"
    _spooled(directory, 4)
    assert main(["spool", str(directory), "--clear"]) == 2
    assert "--clear deletes 4 events" in capsys.readouterr().err
    assert main(["spool", str(directory), "--yes"]) == 2
    assert main(["spool", str(directory), "--clear", "--yes"]) == 0
    assert capsys.readouterr().out.startswith("cleared 4 events (")
    assert inspect(directory).count == 0


def test_spool_missing_or_broken_directory(tmp_path, capsys):
    assert main(["spool", str(tmp_path / "nowhere")]) == 2
    assert "no spool directory at" in capsys.readouterr().err
    directory = tmp_path / "broken"
    directory.mkdir()
    (directory / "spool.sqlite3").write_bytes(b"not a database" * 100)
    assert main(["spool", str(directory)]) == 1
    assert "corrupt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["spool", str(directory), "--send", "--clear"])
    assert info.value.code == 2


def test_spool_help(capsys):
    with pytest.raises(SystemExit):
        main(["spool", "--help"])
    out = capsys.readouterr().out
    for word in ("DIR", "--send", "--clear", "--yes", "--write-key", "--endpoint", "--json"):
        assert word in out


def test_spool_as_a_process(collector, src_env, tmp_path):
    directory = tmp_path / "spool"
    ids, _ = _spooled(directory, 12)
    env = dict(src_env, KLIME_WRITE_KEY=WRITE_KEY, KLIME_ENDPOINT=collector.url)
    shown = subprocess.run(
        [sys.executable, "-m", "klime.cli", "spool", str(directory)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0 and "12 events" in shown.stdout and "0 alive, 1 dead" in shown.stdout
    sent = subprocess.run(
        [sys.executable, "-m", "klime.cli", "spool", str(directory), "--send"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (sent.returncode, sent.stderr) == (0, "") and "sent 12 events in 1 request" in sent.stdout
    assert sorted(collector.message_ids()) == sorted(ids)


CONTROLS = {chr(c) for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))} - {"\n"}


def test_send_output_escapes_terminal_control_characters(env, collector, capsys):
    """A hostile server's text reaches the terminal with its control characters escaped."""
    hostile_200 = json.dumps(
        {
            "status": "ok",
            "accepted": 0,
            "failed": 1,
            "errors": [{"index": 0, "message": "bad \x1b]0;pwned\x07 \u00e9", "code": "c\x1b[2J\x9b1m"}],
        }
    ).encode()
    hostile_400 = json.dumps({"status": "error", "message": "no\x1b[2J\x7f"}).encode()
    collector.respond(
        Fault.status_code(200, body=hostile_200),
        Fault.status_code(400, body=hostile_400),
        Fault.status_code(400, body=hostile_400),
    )
    main(["track", "E", "--user-id", "u"])
    first = capsys.readouterr()
    main(["track", "E", "--user-id", "u"])
    second = capsys.readouterr()
    main(["track", "E", "--user-id", "u", "--json"])
    third = capsys.readouterr()
    for text in (first.out, first.err, second.out, second.err, third.out, third.err):
        assert not CONTROLS & set(text), repr(text)
    assert "bad \\x1b]0;pwned\\x07 \u00e9 (c\\x1b[2J\\x9b1m)" in first.err
    assert "no\\x1b[2J\\x7f" in second.err
    assert json.loads(third.err)["error"].endswith("no\x1b[2J\x7f")  # still valid JSON, same text


def test_verbose_log_lines_escape_a_servers_control_characters(env, collector, capsys):
    hostile_400 = json.dumps({"status": "error", "message": "no\x1b[2J\x7f"}).encode()
    collector.respond(Fault.status_code(400, body=hostile_400))
    main(["--verbose", "track", "E", "--user-id", "u"])
    err = capsys.readouterr().err
    assert not CONTROLS & set(err), repr(err)
    assert "no\\x1b[2J\\x7f" in err
