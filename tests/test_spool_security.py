"""klime.spool (and the spool transport, and ``klime spool``) under hostile conditions: the
spool is private to the user running the app and belongs to one project.

Each test here failed before issue 20: files readable by other users, a spool path planted
by another user (a symlink, a directory it owns, files it owns) followed and used, rows of
another project (endpoint + write key) adopted and sent with this process's key, adopted
rows sent unchecked, ``klime spool`` writing into a directory that is not a spool and
printing terminal escapes, and a batch deleted because a 503's body could not be read.
Tests that need a second local user run as root (files chowned to uid 65534, "nobody")
and are skipped otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from conftest import WRITE_KEY, wait_until
from klime._events import encode_identify, encode_track
from klime.cli._main import main
from klime.devserver import Fault
from klime.errors import SpoolUnavailable
from klime.spool import Spool, inspect, project_id, valid_event
from klime.spool._safety import DEFAULT_PROJECT
from klime.transports.spooled import SpoolTransport

NOBODY = 65534
root_only = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root: plays a second local user by chowning files to uid 65534",
)


def event(seq: str, kind: str = "track", **extra: object) -> bytes:
    fields: Dict[str, object] = {"type": kind, "messageId": seq, "event": "Planted"}
    fields.update(extra)
    return json.dumps(fields, separators=(",", ":")).encode()


def balanced(stats: dict) -> bool:
    return (
        stats["tracked"] + stats["adopted"]
        == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]
    )


def chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for parent, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), uid, uid, follow_symlinks=False)


def snapshot(path: Path) -> Dict[str, bytes]:
    """Every file under ``path`` (relative name -> bytes) and every directory (-> b"<dir>")."""
    found: Dict[str, bytes] = {}
    for parent, dirs, files in os.walk(path):
        for name in dirs:
            found[os.path.relpath(os.path.join(parent, name), path)] = b"<dir>"
        for name in files:
            full = os.path.join(parent, name)
            found[os.path.relpath(full, path)] = Path(full).read_bytes()
    return found


def dead_owner_rows(directory: Path, events: List[bytes], **options: object) -> None:
    """``events`` spooled by an owner that is then gone (closed)."""
    s = Spool.open(directory, **options)  # type: ignore[arg-type]
    s.append(events)
    s.close()


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)  # what most services run with
    try:
        yield
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- 1. private files


def test_every_file_klime_creates_is_0600_in_a_0755_directory(tmp_path, umask_022):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)  # `mkdir -p`, a Dockerfile
    os.chmod(directory, 0o755)
    s = Spool.open(directory)
    try:
        s.append([event(f"e{i}") for i in range(50)])
        s.ack(s.claim(10))
        other = Spool.open(directory)  # a sibling: its lock file, the shared -shm
        other.close()
        names = sorted(os.listdir(directory))
        assert {"spool.sqlite3", "spool.sqlite3-wal", "spool.sqlite3-shm", "open.lock", "owners"} <= set(
            names
        )
        for parent, dirs, files in os.walk(directory):
            for name in files:
                mode = stat.S_IMODE(os.lstat(os.path.join(parent, name)).st_mode)
                assert mode == 0o600, (name, oct(mode))
            for name in dirs:  # owners/: made by klime
                assert stat.S_IMODE(os.lstat(os.path.join(parent, name)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o755  # the app's own choice is kept
    finally:
        s.close()


def test_a_directory_klime_creates_is_0700(tmp_path, umask_022):
    directory = tmp_path / "new" / "spool"
    (tmp_path / "new").mkdir()
    Spool.open(directory).close()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_files_an_older_klime_left_readable_are_made_private(tmp_path, umask_022):
    directory = tmp_path / "spool"
    dead_owner_rows(directory, [event("old")])
    db = directory / "spool.sqlite3"
    os.chmod(db, 0o644)  # what klime before issue 20 left under umask 022
    os.chmod(directory / "open.lock", 0o666)
    s = Spool.open(directory)
    try:
        assert stat.S_IMODE(os.stat(db).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(directory / "open.lock").st_mode) == 0o600
        assert s.adopt() == 1
    finally:
        s.close()


def test_the_client_path_creates_private_files(make_client, collector, tmp_path, umask_022):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    collector.set_mode(Fault.blackhole())
    client = make_client(spool=str(directory), flush_interval=60_000)
    for i in range(5):
        client.track("Private", {"i": i}, user_id="u")
    assert wait_until(lambda: (directory / "spool.sqlite3").exists() and inspect(directory).count == 5, 10)
    for parent, _dirs, files in os.walk(directory):
        for name in files:
            mode = stat.S_IMODE(os.lstat(os.path.join(parent, name)).st_mode)
            assert mode & 0o077 == 0, (name, oct(mode))
    assert balanced(client.stats())


# --------------------------------------------------------------------------- 2. planted paths


def test_a_symlinked_spool_directory_is_refused_and_nothing_is_written_there(tmp_path):
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    link = tmp_path / "spool"
    link.symlink_to(target)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(link)
    assert info.value.reason == "unsafe" and "symbolic link" in str(info.value)
    assert os.listdir(target) == []


def test_a_directory_writable_by_others_is_refused(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir()
    os.chmod(directory, 0o777)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(directory)
    assert info.value.reason == "unsafe" and "writable by group or others" in str(info.value)
    assert os.listdir(directory) == []
    os.chmod(directory, 0o770)
    with pytest.raises(SpoolUnavailable):
        Spool.open(directory)


def test_a_planted_symlink_for_the_database_or_a_lock_file_is_refused(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    elsewhere = tmp_path / "elsewhere.sqlite3"
    elsewhere.write_bytes(b"")
    (directory / "spool.sqlite3").symlink_to(elsewhere)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(directory)
    assert info.value.reason == "unsafe"
    assert elsewhere.read_bytes() == b""
    (directory / "spool.sqlite3").unlink()
    dead_owner_rows(directory, [event("a")])
    (directory / "owners" / "0123.lock").symlink_to(elsewhere)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(directory)
    assert info.value.reason == "unsafe" and "0123.lock" in str(info.value)


@root_only
def test_a_directory_owned_by_another_user_is_refused(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o755)
    os.chown(directory, NOBODY, NOBODY)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(directory)
    assert info.value.reason == "unsafe" and f"uid {NOBODY}" in str(info.value)
    assert os.listdir(directory) == []


@root_only
def test_a_file_owned_by_another_user_in_my_spool_is_refused(tmp_path):
    directory = tmp_path / "spool"
    dead_owner_rows(directory, [event("a")])
    os.chown(directory / "spool.sqlite3", NOBODY, NOBODY)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(directory)
    assert info.value.reason == "unsafe"
    os.chown(directory / "spool.sqlite3", 0, 0)
    planted = directory / "owners" / "feedface.lock"
    planted.write_bytes(b"1\n")
    os.chown(planted, NOBODY, NOBODY)
    with pytest.raises(SpoolUnavailable):
        Spool.open(directory)


@root_only
@pytest.mark.parametrize("planted_as", ["directory", "symlink"])
def test_a_spool_planted_by_another_user_is_never_used_nor_its_events_sent(
    planted_as, make_client, collector, tmp_path, caplog_klime, on_error
):
    attacker = tmp_path / "attacker"
    dead_owner_rows(attacker, [event("planted-1"), event("planted-2")])  # a gone owner's rows
    os.chmod(attacker, 0o755)
    chown_tree(attacker, NOBODY)
    before = snapshot(attacker)
    if planted_as == "directory":
        path = attacker
    else:
        path = tmp_path / "spool"
        path.symlink_to(attacker)
    client = make_client(transport=SpoolTransport(str(path)), on_error=on_error)
    for i in range(3):
        client.track("Mine", {"i": i}, user_id="u")
    assert client.flush(timeout=10).sent == 3
    ids = collector.message_ids()
    assert len(ids) == 3 and not any(i.startswith("planted") for i in ids)
    warnings = [r for r in caplog_klime.records if "NOT used" in r.getMessage()]
    assert len(warnings) == 1 and "refused" in warnings[0].getMessage()
    assert snapshot(attacker) == before  # nothing read into, nothing written
    stats = client.stats()
    assert stats["adopted"] == 0 and stats["spooled"] == 0 and balanced(stats) and on_error.calls == []


def test_the_refusal_warning_reaches_stderr_without_logging(tmp_path, src_env):
    import subprocess
    import sys

    directory = tmp_path / "spool"
    directory.mkdir()
    os.chmod(directory, 0o777)
    code = (
        "import klime\n"
        "from klime.transports.spooled import SpoolTransport\n"
        "from klime.senders.base import Sender\n"
        f"t = SpoolTransport({str(directory)!r})\n"
        "print(t._queue.writer.spool())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=src_env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"
    assert "writable by group or others" in done.stderr and "NOT used" in done.stderr


# --------------------------------------------------------------------------- 3. projects


def test_project_id_is_a_fingerprint_of_endpoint_and_key():
    a = project_id("https://i.klime.com", WRITE_KEY)
    assert a == project_id("https://i.klime.com/", WRITE_KEY)  # a trailing slash is the same endpoint
    assert len(a) == 32 and int(a, 16) >= 0 and WRITE_KEY not in a
    assert hashlib.sha256(WRITE_KEY.encode()).hexdigest()[:32] != a
    others = {
        project_id("https://i.klime.com", "another-key"),
        project_id("https://staging.klime.com", WRITE_KEY),
        project_id("https://i.klime.com", None),
        project_id("https://i.klime.com", ""),
    }
    assert a not in others and len(others) == 4 and DEFAULT_PROJECT not in others | {a}
    with pytest.raises(TypeError):
        project_id(None, WRITE_KEY)  # type: ignore[arg-type]


def test_rows_are_adopted_only_by_a_process_of_the_same_project(tmp_path):
    directory = tmp_path / "spool"
    staging = project_id("http://127.0.0.1:1", "staging-key")
    prod = project_id("http://127.0.0.1:1", "prod-key")
    dead_owner_rows(directory, [event("staging-1"), event("staging-2")], project=staging)
    with Spool.open(directory, project=prod) as s:
        assert s.adopt() == 0 and not s.claim(10, include_waiting=True)
        assert {o.project for o in s.stats().owners} == {staging, prod}
    with Spool.open(directory) as s:  # the default project does not take them either
        assert s.adopt() == 0
    with Spool.open(directory, project=staging) as s:
        assert s.adopt() == 2
        assert [json.loads(e)["messageId"] for e in s.claim(10).events] == ["staging-1", "staging-2"]


def _make_legacy(directory: Path) -> None:
    """Turn a spool into what klime before issue 20 wrote: schema 1, no marker, no project."""
    conn = sqlite3.connect(directory / "spool.sqlite3", isolation_level=None)
    conn.execute("ALTER TABLE owners DROP COLUMN project")
    conn.execute("PRAGMA application_id = 0")
    conn.execute("PRAGMA user_version = 1")
    conn.close()


def test_rows_of_an_older_klime_are_kept_and_adopted_only_by_the_default_project(tmp_path, caplog_klime):
    directory = tmp_path / "spool"
    dead_owner_rows(directory, [event("legacy-1"), event("legacy-2")])
    _make_legacy(directory)
    assert inspect(directory).count == 2  # readable as is, not migrated by a look
    mine = project_id("http://127.0.0.1:1", WRITE_KEY)
    with Spool.open(directory, project=mine) as s:  # migrates: the rows stay
        assert s.adopt() == 0
        assert s.stats().count == 2
    assert any("not sent automatically" in r.getMessage() for r in caplog_klime.records)
    conn = sqlite3.connect(directory / "spool.sqlite3")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM owners WHERE project IS NULL").fetchone()[0] == 1
    conn.close()
    with Spool.open(directory, project=mine, adopt_legacy=True) as s:  # what `klime spool --send` does
        assert s.adopt() == 2


def test_a_client_of_another_project_never_sends_a_dead_process_rows(make_client, collector, tmp_path):
    directory = tmp_path / "spool"
    staging = project_id("http://staging.invalid", "staging-key")
    dead_owner_rows(directory, [event("staging-1")], project=staging)
    prod = project_id(collector.url, WRITE_KEY)
    client = make_client(transport=SpoolTransport(str(directory), project=prod))
    client.track("Prod", user_id="u")
    assert client.flush(timeout=10).sent == 1
    assert len(collector.message_ids()) == 1 and "staging-1" not in collector.message_ids()
    stats = client.stats()
    assert stats["adopted"] == 0 and balanced(stats)
    assert inspect(directory).count == 1  # staging's row waits for staging


# --------------------------------------------------------------------------- 4. adopted bodies

INVALID = [
    b"not json at all",
    b"[1, 2, 3]",
    b'"a string"',
    json.dumps({"type": "page", "messageId": "m"}).encode(),  # not a type klime sends
    json.dumps({"type": "track"}).encode(),  # no messageId
    json.dumps({"type": "track", "messageId": 7}).encode(),
    json.dumps({"type": "track", "messageId": "big", "pad": "x" * 204_800}).encode(),
    b"[" * 100_000 + b"]" * 100_000,  # deep enough to break a recursive parser
    b'{"type": "track", "messageId": "\xff\xfe"}',  # not UTF-8
]


def test_valid_event():
    assert (
        valid_event(event("ok")) and valid_event(event("ok", "identify")) and valid_event(event("g", "group"))
    )
    assert not any(valid_event(body) for body in INVALID)
    assert not valid_event("a str row")


def test_adopted_rows_that_are_not_klime_events_are_deleted_counted_and_returned(tmp_path):
    directory = tmp_path / "spool"
    good = [event("good-1"), event("good-2", "identify")]
    dead_owner_rows(directory, [good[0], *INVALID, good[1]])
    with Spool.open(directory) as s:
        result = s.adopt_events()
        assert result.adopted == 2 and len(result.invalid) == len(INVALID)
        assert all(isinstance(json.loads(body), dict) for body in result.invalid)  # reportable
        assert list(s.claim(100).events) == good
        stats = s.stats()
        assert stats.count == 2 and stats.dropped_count == len(INVALID)
        assert s.counters()["invalid"] == len(INVALID)


def test_the_transport_drops_and_reports_invalid_adopted_rows_and_sends_the_rest(
    make_client, collector, tmp_path, on_error
):
    directory = tmp_path / "spool"
    good = [encode_track("Adopted", {"n": 1}, "u1", None), encode_identify("u2", {"plan": "pro"})]
    dead_owner_rows(directory, [good[0], *INVALID, good[1]])
    client = make_client(transport=SpoolTransport(str(directory)), on_error=on_error)
    client.track("Mine", user_id="u")
    assert wait_until(lambda: len(collector.message_ids()) == 3, 15), collector.message_ids()
    assert client.flush(timeout=10).unsent == 0
    assert set(collector.message_ids()) >= {json.loads(g)["messageId"] for g in good}
    stats = client.stats()
    assert stats["adopted"] == 2 + len(INVALID) and stats["dropped"] == len(INVALID) and stats["sent"] == 3
    assert balanced(stats)
    assert len(on_error.events) == len(INVALID)


# --------------------------------------------------------------------------- 5. klime spool


def _foreign_directory(tmp_path: Path) -> Path:
    directory = tmp_path / "not-a-spool"
    directory.mkdir(mode=0o700)
    conn = sqlite3.connect(directory / "spool.sqlite3")
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('mine, not klime''s')")
    conn.commit()
    conn.close()
    (directory / "README").write_text("another program's files\n")
    return directory


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["--json"],
        ["--send", "--endpoint", "http://127.0.0.1:9", "--write-key", "k"],
        ["--clear", "--yes"],
    ],
    ids=["show", "json", "send", "clear"],
)
def test_klime_spool_refuses_a_directory_that_is_not_a_spool_and_changes_nothing(tmp_path, capsys, command):
    directory = _foreign_directory(tmp_path)
    before = snapshot(directory)
    assert main(["spool", str(directory), *command]) == 1
    assert "not a klime spool" in capsys.readouterr().err
    assert snapshot(directory) == before
    (directory / "spool.sqlite3").unlink()  # no database at all, an unrelated file
    before = snapshot(directory)
    assert main(["spool", str(directory), *command]) == 1
    assert "not a klime spool" in capsys.readouterr().err
    assert snapshot(directory) == before


def test_klime_spool_send_in_an_empty_directory_creates_nothing(tmp_path, capsys):
    directory = tmp_path / "empty"
    directory.mkdir(mode=0o700)
    assert (
        main(["spool", str(directory), "--send", "--endpoint", "http://127.0.0.1:9", "--write-key", "k"]) == 1
    )
    assert "nothing to send" in capsys.readouterr().err and os.listdir(directory) == []


def test_the_library_leaves_another_programs_database_alone(tmp_path):
    directory = _foreign_directory(tmp_path)
    before = snapshot(directory)
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(directory)
    assert info.value.reason == "foreign"
    after = snapshot(directory)
    assert {k: v for k, v in after.items() if k != "open.lock" and not k.startswith("owners")} == before


def test_klime_spool_escapes_terminal_control_characters(monkeypatch, collector, tmp_path, capsys):
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    directory = tmp_path / "spool"
    evil = event("\x1b]0;owned\x07id", name="x", event="\x1b[31mred\x1b[0m\u202e")
    dead_owner_rows(directory, [evil])
    conn = sqlite3.connect(directory / "spool.sqlite3", isolation_level=None)
    conn.execute("UPDATE owners SET host = ?", ("host\x1b[2J",))
    conn.close()
    dead = Spool.open(directory)  # a dead owner still registered: shown with its host
    dead.close()
    assert main(["spool", str(directory)]) == 0
    shown = capsys.readouterr().out
    collector.respond(Fault.partial(0))
    assert main(["spool", str(directory), "--send"]) == 1
    sent = capsys.readouterr().out
    for out in (shown, sent):
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b[31mred" in sent and "\\u202e" in sent


# --------------------------------------------------------------------------- 6. unknown outcomes


def test_a_503_with_an_unreadable_body_keeps_the_events_in_the_spool(
    make_client, collector, tmp_path, on_error
):
    directory = tmp_path / "spool"
    nested = b"[" * 100_000 + b"]" * 100_000
    collector.set_mode(Fault.status_code(503, body=nested))
    client = make_client(
        transport=SpoolTransport(str(directory), retry_initial_delay=0.01),
        retry_max_attempts=1,
        on_error=on_error,
    )
    for i in range(5):
        client.track("Kept", {"i": i}, user_id="u")
    # the batch is tried, settled, and tried again: it was given back, not deleted
    assert wait_until(lambda: len(collector.requests()) >= 2, 20), collector.requests()
    stats = client.stats()
    assert stats["failed"] == 0 and stats["queued"] == 5 and balanced(stats), stats
    assert on_error.calls == []
    client.shutdown(timeout=1)
    assert inspect(directory).count == 5
    collector.set_mode(None)
    with Spool.open(directory) as s:  # the next process sends them
        assert s.adopt() == 5
