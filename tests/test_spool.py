"""The durable spool (klime.spool): queue semantics, ownership and adoption across real
processes, forks, the byte cap, and every way the storage can fail.

Multi-process tests run small worker programs (below) as real processes through
``subprocess``; each writes what it did to its own log file with ``O_APPEND`` writes made
*before* and *after* each spool call, so a process SIGKILLed at any instant leaves an exact
record of what it had certainly done and what it might have done. Every wait has a
deadline; nothing sleeps and hopes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from conftest import wait_until
from klime.errors import KlimeError, SpoolUnavailable
from klime.spool import Claimed, Spool, clear, inspect, retry_time
from klime.spool._store import DB_NAME
from support.forking import fork_child, wait_child

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads (3.12+)

SRC = str(Path(__file__).resolve().parent.parent / "src")
DEADLINE = 60.0


def event(seq: str, pad: int = 0) -> bytes:
    return json.dumps({"type": "track", "messageId": seq, "pad": "x" * pad}, separators=(",", ":")).encode()


def seqs(events: Tuple[bytes, ...] | List[bytes]) -> List[str]:
    return [json.loads(e)["messageId"] for e in events]


@pytest.fixture
def spool_dir(tmp_path: Path) -> str:
    return str(tmp_path / "spool")


@pytest.fixture
def opened(spool_dir: str) -> Iterator[List[Spool]]:
    """Spools opened by a test; closed afterwards."""
    spools: List[Spool] = []
    yield spools
    for s in spools:
        s.close()


def open_spool(opened: List[Spool], directory: str, **options: object) -> Spool:
    s = Spool.open(directory, **options)  # type: ignore[arg-type]
    opened.append(s)
    return s


# --------------------------------------------------------------------------- worker programs

PRELUDE = """
import json, os, sys, time
sys.path.insert(0, {src!r})
from klime.spool import Spool

def note(fd, kind, ids):
    os.write(fd, (kind + " " + ",".join(ids) + "\\n").encode())

def body(seq):
    return json.dumps({{"type": "track", "messageId": seq}}).encode()

def ids_of(claimed):
    return [json.loads(e)["messageId"] for e in claimed.events]
"""

#: Appends ``total`` events 20 at a time, sending (claim + ack) some as it goes; then claims
#: one batch and holds it forever ("holding"): the test SIGKILLs it somewhere on the way.
OWNER = """
directory, name, total, logpath = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
log = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
spool = Spool.open(directory)
note(log, "owner", [spool.owner])
n = 0
while n < total:
    batch = ["%s-%d" % (name, i) for i in range(n, min(total, n + 20))]
    note(log, "appending", batch)
    spool.append([body(s) for s in batch])
    note(log, "appended", batch)
    n += len(batch)
    if n % 100 == 0:
        c = spool.claim(50)
        note(log, "acking", ids_of(c))
        spool.ack(c)
        note(log, "acked", ids_of(c))
c = spool.claim(30)
note(log, "holding", ids_of(c))
time.sleep(120)  # killed long before
"""

#: Adopts, claims and acks until the stop file exists and the whole spool is empty.
ADOPTER = """
directory, logpath, stopfile, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
own = int(sys.argv[5]) if len(sys.argv) > 5 else 0
name = os.path.basename(logpath)
log = os.open(logpath, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
spool = Spool.open(directory)
note(log, "owner", [spool.owner])
deadline = time.monotonic() + seconds
appended = 0
while time.monotonic() < deadline:
    if appended < own:
        batch = ["%s-%d" % (name, i) for i in range(appended, min(own, appended + 20))]
        spool.append([body(s) for s in batch])
        note(log, "appended", batch)
        appended += len(batch)
    note(log, "adopted", [str(spool.adopt())])
    c = spool.claim(40)
    if c:
        note(log, "claimed", ids_of(c))
        spool.ack(c)
        note(log, "acked", ids_of(c))
        continue
    if appended >= own and os.path.exists(stopfile) and spool.stats().count == 0:
        spool.close()
        sys.exit(0)
    time.sleep(0.002)  # polling interval of an idle worker
sys.exit(3)
"""

#: Appends ``total`` events and leaves through os._exit without closing: a dead owner.
FILLER = """
directory, name, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
spool = Spool.open(directory)
for n in range(0, total, 100):
    spool.append([body("%s-%d" % (name, i)) for i in range(n, min(total, n + 100))])
print(spool.owner, flush=True)
os._exit(0)
"""


def run_py(code: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", PRELUDE.format(src=SRC) + code, *args], text=True, **popen
    )


def finish(process: subprocess.Popen[str], timeout: float = DEADLINE) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        pytest.fail(f"worker {process.args!r} did not finish within {timeout} s")


class Log:
    """One worker's log: kind -> ids, in order."""

    def __init__(self, path: Path) -> None:
        self.entries: List[Tuple[str, List[str]]] = []
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            self.entries.append((kind, rest.split(",") if rest else []))

    def ids(self, kind: str) -> List[str]:
        return [i for k, ids in self.entries if k == kind for i in ids]

    def count(self, kind: str) -> int:
        return len(self.ids(kind))


def log_count(path: Path, kind: str) -> int:
    return Log(path).count(kind)


def rows_in(directory: str) -> int:
    conn = sqlite3.connect(os.path.join(directory, DB_NAME))
    try:
        return int(conn.execute("SELECT COUNT(*) FROM events").fetchone()[0])
    finally:
        conn.close()


# --------------------------------------------------------------------------- queue basics


def test_append_claim_ack_in_order(opened, spool_dir):
    s = open_spool(opened, spool_dir)
    assert os.stat(spool_dir).st_mode & 0o777 == 0o700
    result = s.append([event(f"e{i}") for i in range(10)])
    assert (result.appended, result.dropped) == (10, ())
    first = s.claim(4)
    assert seqs(first.events) == ["e0", "e1", "e2", "e3"] and first.attempts == (0, 0, 0, 0)
    second = s.claim(100)
    assert seqs(second.events) == [f"e{i}" for i in range(4, 10)]
    assert not s.claim(100)  # everything is claimed
    assert s.ack(first) == 4
    assert s.ack(first) == 0  # an acked row never comes back, and acking twice is harmless
    assert s.reject(second) == 6
    stats = s.stats()
    assert (stats.count, stats.bytes, stats.claimed, stats.oldest_age) == (0, 0, 0, None)
    assert s.counters() == {
        "appended": 10,
        "dropped": 0,
        "dropped_bytes": 0,
        "claimed": 10,
        "acked": 4,
        "rejected": 6,
        "released": 0,
        "adopted": 0,
        "invalid": 0,
    }


def test_claim_respects_the_request_body_limit(opened, spool_dir):
    s = open_spool(opened, spool_dir)
    events = [event(f"e{i}", pad=100) for i in range(5)]
    s.append(events)
    size = len(events[0])
    body_of_two = len(b'{"batch":[]}') + 2 * size + 1
    batch = s.claim(100, body_of_two)
    assert len(batch) == 2 and batch.body_size == body_of_two
    alone = s.claim(100, 1)  # too small for any event: one comes anyway
    assert len(alone) == 1


def test_release_schedules_a_retry(opened, spool_dir):
    now = [1000.0]
    s = open_spool(opened, spool_dir, clock=lambda: now[0])
    s.append([event("a"), event("b")])
    batch = s.claim(1)
    assert s.release(batch, retry_at=retry_time(1, 2.0, 16.0, now=now[0])) == 1
    assert seqs(s.claim(10).events) == ["b"]  # "a" waits for its retry
    assert not s.claim(10)
    assert s.stats().waiting == 1
    now[0] += 2.0
    again = s.claim(10)
    assert seqs(again.events) == ["a"] and again.attempts == (1,)
    assert s.release(again, retry_at=now[0] + 500) == 1
    assert seqs(s.claim(10, include_waiting=True).events) == ["a"]
    assert retry_time(5, 1.0, 16.0, now=0.0) == 16.0 and retry_time(3, 1.0, 16.0, now=0.0) == 4.0


def test_split_settles_parts_of_a_batch(opened, spool_dir):
    s = open_spool(opened, spool_dir)
    s.append([event(f"e{i}") for i in range(5)])
    batch = s.claim(5)
    rejected, accepted = batch.split([1, 3])
    assert seqs(rejected.events) == ["e1", "e3"] and seqs(accepted.events) == ["e0", "e2", "e4"]
    assert (s.reject(rejected), s.ack(accepted)) == (2, 3)
    assert "messageId" not in repr(batch) and repr(batch) == f"Claimed(<5 events, {batch.nbytes} bytes>)"


def test_bad_arguments(opened, spool_dir):
    from klime.errors import ConfigurationError

    for bad in ({"max_bytes": 0}, {"busy_timeout": -1}, {"synchronous": "OFF"}, {"max_bytes": True}):
        with pytest.raises(ConfigurationError):
            Spool.open(spool_dir, **bad)  # type: ignore[arg-type]
    s = open_spool(opened, spool_dir)
    with pytest.raises(TypeError):
        s.append(["not bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        s.claim(0)
    with pytest.raises(ValueError):
        s.release(Claimed(s.owner or ""), retry_at=float("nan"))
    with pytest.raises(TypeError):
        s.ack(["x"])  # type: ignore[arg-type]


def test_closed_spool_raises_and_close_is_idempotent(spool_dir):
    s = Spool.open(spool_dir)
    s.close()
    s.close()
    with pytest.raises(SpoolUnavailable) as info:
        s.append([event("a")])
    assert info.value.reason == "closed" and isinstance(info.value, KlimeError)


def test_an_owner_without_rows_leaves_no_trace(spool_dir):
    s = Spool.open(spool_dir)
    token = s.owner
    s.close()
    assert os.listdir(os.path.join(spool_dir, "owners")) == []
    assert inspect(spool_dir).owners == ()
    t = Spool.open(spool_dir)
    t.append([event("a")])
    left = t.owner
    t.close()  # rows left: its lock file stays for an adopter, unlocked
    assert os.listdir(os.path.join(spool_dir, "owners")) == [f"{left}.lock"]
    (owner,) = inspect(spool_dir).owners
    assert owner.token == left != token and owner.alive is False and owner.count == 1


# --------------------------------------------------------------------------- the byte cap


def test_byte_cap_drops_the_oldest_unclaimed_rows(opened, spool_dir):
    events = [event(f"e{i:02d}", pad=80) for i in range(20)]
    size = len(events[0])
    s = open_spool(opened, spool_dir, max_bytes=10 * size)
    assert s.append(events[:10]).dropped == ()
    held = s.claim(2)  # e0, e1 are in flight: never dropped
    result = s.append(events[10:13])
    assert seqs(result.dropped) == ["e02", "e03", "e04"]
    assert (result.appended, result.dropped_count, result.dropped_bytes) == (3, 3, 3 * size)
    stats = s.stats()
    assert stats.bytes == 10 * size and stats.count == 10
    assert (stats.dropped_count, stats.dropped_bytes) == (3, 3 * size)
    # events of the same call go too when they are the oldest left
    s.ack(held)
    rest = s.claim(100)
    big = s.append(events[13:20])  # 7 new + 8 claimed = 15 > 10: only new ones are unclaimed
    assert seqs(big.dropped) == ["e13", "e14", "e15", "e16", "e17"]
    s.ack(rest)
    assert seqs(s.claim(100).events) == ["e18", "e19"]
    assert s.counters()["dropped"] == 8


def test_an_event_larger_than_the_cap_is_dropped_alone(opened, spool_dir):
    s = open_spool(opened, spool_dir, max_bytes=1000)
    s.append([event("small")])
    result = s.append([event("huge", pad=2000), event("next")])
    assert seqs(result.dropped) == ["huge"] and result.appended == 1
    assert seqs(s.claim(10).events) == ["small", "next"]
    assert inspect(spool_dir).dropped_count == 1


def test_the_cap_is_shared_and_each_owner_drops_only_its_own_events(opened, spool_dir):
    events = [event(f"e{i:02d}", pad=80) for i in range(10)]
    size = len(events[0])
    a = open_spool(opened, spool_dir, max_bytes=4 * size)
    b = open_spool(opened, spool_dir, max_bytes=4 * size)
    a.append(events[:3])
    result = b.append(events[3:6])  # over the cap: b makes room from its own oldest
    assert seqs(result.dropped) == ["e03", "e04"]
    assert inspect(spool_dir).bytes == 4 * size
    result = a.append(events[6:8])  # a's turn: its own oldest go
    assert seqs(result.dropped) == ["e00", "e01"]
    assert seqs(a.claim(10).events) == ["e02", "e06", "e07"] and seqs(b.claim(10).events) == ["e05"]


# --------------------------------------------------------------------------- ownership


def test_live_owners_never_claim_each_others_rows(opened, spool_dir):
    a = open_spool(opened, spool_dir)
    b = open_spool(opened, spool_dir)
    a.append([event("a1"), event("a2")])
    b.append([event("b1")])
    assert a.adopt() == 0 and b.adopt() == 0  # both alive (flock is per open file, even in one process)
    assert seqs(a.claim(10).events) == ["a1", "a2"] and seqs(b.claim(10).events) == ["b1"]
    assert b.ack(a.claim(10)) == 0


def test_rows_of_a_closed_owner_are_adopted_due_now_with_their_attempts(opened, spool_dir):
    now = [100.0]
    a = open_spool(opened, spool_dir, clock=lambda: now[0])
    a.append([event("x"), event("y"), event("z")])
    batch = a.claim(1)
    a.release(batch, retry_at=200.0)  # a's backoff: its own view of the endpoint
    in_flight = a.claim(1)  # "y": in flight when its owner goes
    assert seqs(in_flight.events) == ["y"]
    a.close()
    b = open_spool(opened, spool_dir, clock=lambda: now[0])
    assert b.adopt() == 3 and b.adopt() == 0
    adopted = b.claim(10)  # due now: the adopter decides for itself when to back off
    assert seqs(adopted.events) == ["x", "y", "z"] and adopted.attempts == (1, 0, 0)
    assert os.listdir(os.path.join(spool_dir, "owners")) == [f"{b.owner}.lock"]


def test_a_killed_owner_is_adopted_and_every_row_delivered_exactly_once(tmp_path, spool_dir):
    """Three owners are SIGKILLed at different points (mid-append, mid-send, holding a batch)
    while four adopters race; every row is then acknowledged exactly once by the adopters,
    except those the dead owner certainly acknowledged, which never come back."""
    owners = []
    for name, total in (("k0", 4000), ("k1", 4000), ("k2", 300)):
        path = tmp_path / f"{name}.log"
        owners.append((name, path, run_py(OWNER, spool_dir, name, str(total), str(path))))
    stop = tmp_path / "stop"
    adopters = [
        (tmp_path / f"a{i}.log", run_py(ADOPTER, spool_dir, str(tmp_path / f"a{i}.log"), str(stop), "50"))
        for i in range(4)
    ]
    # kill k0 mid-stream, k1 once it has sent some, k2 while it holds a claimed batch
    conditions = {
        "k0": lambda p: log_count(p, "appended") >= 600,
        "k1": lambda p: log_count(p, "acked") >= 200,
        "k2": lambda p: any(k == "holding" for k, _ in Log(p).entries),
    }
    for name, path, process in owners:
        ready = conditions[name]
        assert wait_until(lambda: ready(path), timeout=DEADLINE), f"{name} made no progress"  # noqa: B023
        process.send_signal(signal.SIGKILL)
        assert process.wait(DEADLINE) == -signal.SIGKILL
    stop.touch()
    for path, process in adopters:
        assert finish(process) == 0, path.read_text()[-2000:]

    adopter_acks: Counter[str] = Counter()
    adopted = 0
    for path, _ in adopters:
        log = Log(path)
        adopter_acks.update(log.ids("acked"))
        assert Counter(log.ids("claimed")) == Counter(log.ids("acked"))
        adopted += sum(int(n) for n in log.ids("adopted"))
    assert all(n == 1 for n in adopter_acks.values()), "a row was delivered twice by the adopters"
    for name, path, _ in owners:
        log = Log(path)
        certain = set(log.ids("appended"))
        maybe = set(log.ids("appending")) - certain
        acked = set(log.ids("acked"))
        unsure = set(log.ids("acking")) - acked
        mine = {s for s in adopter_acks if s.startswith(name + "-")}
        assert not mine & acked, f"{name}: a row acknowledged by its owner came back"
        assert certain - acked - unsure <= mine, f"{name}: rows lost"
        assert mine <= certain | maybe
        if name == "k2":
            assert len(log.ids("holding")) == 30 and set(log.ids("holding")) <= mine  # in flight: sent again
    assert adopted == len(adopter_acks) > 500
    assert rows_in(spool_dir) == 0
    assert inspect(spool_dir).owners == ()


def test_two_live_workers_claiming_concurrently_never_overlap(tmp_path, spool_dir):
    """A dead owner's 3,000 rows, plus 1,000 of each worker's own, claimed by two live workers
    at once: every row is claimed exactly once, by one worker."""
    filler = run_py(FILLER, spool_dir, "dead", "3000", stdout=subprocess.PIPE)
    filler.communicate(timeout=DEADLINE)
    assert filler.returncode == 0
    stop = tmp_path / "stop"
    stop.touch()
    workers = [
        (tmp_path / f"w{i}", run_py(ADOPTER, spool_dir, str(tmp_path / f"w{i}"), str(stop), "50", "1000"))
        for i in range(2)
    ]
    for path, process in workers:
        assert finish(process) == 0, path.read_text()[-2000:]
    claims: Counter[str] = Counter()
    per_worker: List[Set[str]] = []
    for path, _ in workers:
        log = Log(path)
        claims.update(log.ids("claimed"))
        per_worker.append(set(log.ids("claimed")))
    expected = {f"dead-{i}" for i in range(3000)} | {f"w{w}-{i}" for w in range(2) for i in range(1000)}
    assert set(claims) == expected and all(n == 1 for n in claims.values())
    assert not per_worker[0] & per_worker[1]
    for w in range(2):  # a worker's own rows are never claimed by the other
        assert {f"w{w}-{i}" for i in range(1000)} <= per_worker[w]


def test_a_lock_file_deleted_by_hand_does_not_make_a_live_owner_look_dead(opened, spool_dir):
    a = open_spool(opened, spool_dir)
    a.append([event("a")])
    os.unlink(os.path.join(spool_dir, "owners", f"{a.owner}.lock"))
    b = open_spool(opened, spool_dir)
    assert b.adopt() == 0  # the recorded pid and start time say: alive
    assert seqs(a.claim(10).events) == ["a"]


# --------------------------------------------------------------------------- fork


def test_a_forked_child_is_a_new_owner_and_never_touches_the_parents_rows(opened, spool_dir):
    parent = open_spool(opened, spool_dir)
    parent.append([event(f"p{i}") for i in range(10)])
    held = parent.claim(5)
    token = parent.owner

    def child() -> bool:
        if parent.owner is not None:  # the fork hook already forgot the parent's identity
            return False
        if parent.ack(held) != 0:  # the parent's batch is not the child's to settle
            return False
        if parent.claim(100) or parent.adopt() != 0:  # parent alive: nothing to take
            return False
        parent.append([event("c1"), event("c2")])
        mine = parent.claim(100)
        return parent.owner not in (None, token) and seqs(mine.events) == ["c1", "c2"]

    assert wait_child(fork_child(child), DEADLINE) == 0
    assert parent.owner == token
    assert parent.ack(held) == 5
    assert seqs(parent.claim(100).events) == [f"p{i}" for i in range(5, 10)]
    # the child died holding its two rows: adoptable, while the parent's lock is intact
    other = open_spool(opened, spool_dir)
    assert other.adopt() == 2
    assert seqs(other.claim(100).events) == ["c1", "c2"]


NO_HOOKS_FORK = """
import ctypes, signal
directory, out = sys.argv[1], sys.argv[2]
spool = Spool.open(directory)
spool.append([body("parent-1"), body("parent-2")])
parent_token = spool.owner
pid = ctypes.CDLL(None).fork()  # as uWSGI does: no Python fork hooks
if pid == 0:
    ok = spool.owner is None  # the pid check noticed
    spool.append([body("child-1")])
    ok = ok and spool.owner not in (None, parent_token)
    ok = ok and ids_of(spool.claim(10)) == ["child-1"] and spool.adopt() == 0
    with open(out, "w") as f:
        f.write("ok" if ok else "bad")
    os._exit(0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline and not os.waitpid(pid, os.WNOHANG)[0]:
    time.sleep(0.005)
print(ids_of(spool.claim(10)), flush=True)
"""


def test_a_fork_without_python_hooks_is_detected_by_pid(tmp_path, spool_dir):
    out = tmp_path / "child"
    process = run_py(NO_HOOKS_FORK, spool_dir, str(out), stdout=subprocess.PIPE)
    stdout, _ = process.communicate(timeout=DEADLINE)
    assert process.returncode == 0
    assert out.read_text() == "ok"
    assert stdout.strip() == "['parent-1', 'parent-2']"


IDLE_CHILD = """
directory = sys.argv[1]
spool = Spool.open(directory)
spool.append([body("p-%d" % i) for i in range(5)])
pid = os.fork()
if pid == 0:
    print(os.getpid(), flush=True)  # the fork hooks have run by now
    time.sleep(60)  # never touches the spool; killed by the test
    os._exit(0)
time.sleep(60)
"""


def test_a_child_that_outlives_its_killed_parent_does_not_keep_the_parents_rows(opened, spool_dir):
    """flock is shared by inherited descriptors: the fork hook closes the child's copy, so a
    parent killed while its idle child lives is still seen as dead."""
    process = run_py(IDLE_CHILD, spool_dir, stdout=subprocess.PIPE)
    assert process.stdout is not None
    child_pid = int(process.stdout.readline())
    try:
        process.send_signal(signal.SIGKILL)
        process.wait(DEADLINE)
        os.kill(child_pid, 0)  # still alive
        adopter = open_spool(opened, spool_dir)
        assert adopter.adopt() == 5
    finally:
        os.kill(child_pid, signal.SIGKILL)
        process.stdout.close()


FORK_STORM = """
import threading
directory = sys.argv[1]
spool = Spool.open(directory)
stop = threading.Event()
def hammer():
    n = 0
    while not stop.is_set():
        spool.append([body("t-%d" % (n + i)) for i in range(20)])
        n += 20
        spool.ack(spool.claim(20))
thread = threading.Thread(target=hammer, daemon=True)
thread.start()
failures = 0
for i in range(20):
    pid = os.fork()
    if pid == 0:
        try:
            spool.append([body("child-%d" % i)])
            mine = spool.claim(10)
            ok = ids_of(mine) == ["child-%d" % i] and spool.ack(mine) == 1 and not spool.claim(10)
            spool.close()
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            failures += os.waitstatus_to_exitcode(status) != 0
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9); os.waitpid(pid, 0); failures += 1; break
        time.sleep(0.002)
stop.set()
thread.join(10)
check = spool._db.conn.execute("PRAGMA integrity_check").fetchone()[0]
print(failures, check, flush=True)
"""


def test_forks_while_another_thread_uses_the_spool(spool_dir):
    process = run_py(FORK_STORM, spool_dir, stdout=subprocess.PIPE)
    stdout, _ = process.communicate(timeout=DEADLINE)
    assert process.returncode == 0
    assert stdout.split() == ["0", "ok"]


# --------------------------------------------------------------------------- failures


def test_a_corrupt_file_is_moved_aside_and_a_fresh_spool_started(spool_dir, caplog_klime):
    os.makedirs(spool_dir)
    garbage = os.urandom(16384)
    Path(spool_dir, DB_NAME).write_bytes(garbage)
    s = Spool.open(spool_dir)
    try:
        assert s.moved_aside is not None and re.search(
            r"spool\.sqlite3\.corrupt-\d{8}T\d{12}Z$", s.moved_aside
        )
        assert Path(s.moved_aside).read_bytes() == garbage
        assert "was corrupt and was moved aside to " + s.moved_aside in caplog_klime.text
        s.append([event("a")])
        assert seqs(s.claim(10).events) == ["a"]
    finally:
        s.close()


def test_corruption_found_while_running_is_recovered_and_siblings_follow(opened, spool_dir, caplog_klime):
    a = open_spool(opened, spool_dir)
    a.append([event(f"e{i}", pad=400) for i in range(300)])
    a._db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # type: ignore[union-attr]
    path = os.path.join(spool_dir, DB_NAME)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # keep the header and the first tables, damage the rows
        f.seek(8 * 4096)
        f.write(os.urandom(size - 8 * 4096))
    b = Spool.open(spool_dir)
    opened.append(b)
    found = b.moved_aside is not None
    for _ in range(3):  # opening may find it; else the first operation that reads the rows does
        if found:
            break
        try:
            b.claim(100)
            b.append([event("x")])
            b.stats()
            b.adopt()
        except SpoolUnavailable as exc:
            assert exc.reason == "corrupt" and exc.recovered and "moved aside" in str(exc)
            found = True
    assert found and b.moved_aside and os.path.exists(b.moved_aside)
    b.append([event("fresh")])
    # a sibling still on the old file notices the replacement and starts over on the new one
    assert a.claim(100).events == ()
    a.append([event("sibling")])
    assert "was replaced; reopening it" in caplog_klime.text
    assert inspect(spool_dir).count == 2


def test_a_path_that_is_not_a_directory_is_unavailable(tmp_path):
    (tmp_path / "file").write_text("")
    for path in (tmp_path / "file", tmp_path / "file" / "spool"):
        with pytest.raises(SpoolUnavailable) as info:
            Spool.open(path)
        assert info.value.reason == "unwritable" and str(path) in str(info.value)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    # mode=0700: a tmpfs root is 1777 by default, which the spool refuses (writable by others)
    options += ",mode=0700"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory this process cannot write: chmod for a normal user; for root (who ignores
    permissions) a read-only tmpfs."""
    target = tmp_path / "ro"
    if os.geteuid() != 0:
        target.mkdir()
        target.chmod(0o500)
        yield target
        target.chmod(0o700)
        return
    if not _mount_tmpfs(target, "ro,size=64k"):
        pytest.skip("running as root and cannot mount a read-only tmpfs")
    try:
        yield target
    finally:
        _umount(target)


def test_an_unwritable_directory_is_unavailable(readonly_dir):
    for path in (readonly_dir, readonly_dir / "spool"):
        with pytest.raises(SpoolUnavailable) as info:
            Spool.open(path)
        assert info.value.reason == "unwritable", info.value


def test_an_existing_spool_on_a_read_only_file_system(tmp_path):
    target = tmp_path / "fs"
    if not _mount_tmpfs(target, "size=1m"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        s = Spool.open(target)
        s.append([event("a")])
        s.close()
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True, capture_output=True)
        with pytest.raises(SpoolUnavailable) as info:
            Spool.open(target)
        assert info.value.reason == "unwritable", info.value
        with pytest.raises(SpoolUnavailable):
            inspect(target)
    finally:
        _umount(target)


def test_a_full_disk_is_unavailable_until_space_is_freed(tmp_path):
    target = tmp_path / "tiny"
    if not _mount_tmpfs(target, "size=1m"):
        pytest.skip("needs root to mount a tmpfs")
    try:
        filler = target / "filler"
        filler.write_bytes(b"\0" * 600_000)
        s = Spool.open(target / "spool")
        stored = 0
        error: Optional[SpoolUnavailable] = None
        for i in range(200):  # ~400 KiB left: full within 60 appends of 8 KiB
            try:
                stored += s.append([event(f"e{i}-{j}", pad=400) for j in range(20)]).appended
            except SpoolUnavailable as exc:
                error = exc
                break
        assert error is not None and error.reason == "full", error
        assert "no space left" in str(error)
        filler.unlink()
        assert s.stats().count == stored  # the failed append stored nothing; the rest is intact
        assert s.append([event("after")]).appended == 1
        batch = s.claim(100)
        assert s.ack(batch) == len(batch) > 0
        s.close()
    finally:
        _umount(target)


def test_a_full_database_injected(opened, spool_dir):
    s = open_spool(opened, spool_dir)
    s.append([event("a")])
    conn = s._db.conn  # type: ignore[union-attr]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")
    with pytest.raises(SpoolUnavailable) as info:
        s.append([event(f"b{i}", pad=4000) for i in range(10)])
    assert info.value.reason == "full"
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert s.append([event("c")]).appended == 1
    assert seqs(s.claim(100).events) == ["a", "c"]


def test_a_database_locked_beyond_the_busy_timeout(opened, spool_dir):
    s = open_spool(opened, spool_dir, busy_timeout=0.2)
    s.append([event("a")])
    other = sqlite3.connect(os.path.join(spool_dir, DB_NAME), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(SpoolUnavailable) as info:
            s.append([event("b")])
        assert info.value.reason == "locked" and 0.15 < time.monotonic() - started < 5
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert seqs(s.claim(10).events) == ["a"]  # usable again


def test_opening_waits_for_the_open_lock_then_gives_up(spool_dir):
    import fcntl

    os.makedirs(spool_dir)
    fd = os.open(os.path.join(spool_dir, "open.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(SpoolUnavailable) as info:
            Spool.open(spool_dir, busy_timeout=0.1)
        assert info.value.reason == "locked"
    finally:
        os.close(fd)
    Spool.open(spool_dir).close()


def test_a_newer_schema_is_left_alone(spool_dir):
    Spool.open(spool_dir).close()
    conn = sqlite3.connect(os.path.join(spool_dir, DB_NAME))
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SpoolUnavailable) as info:
        Spool.open(spool_dir)
    assert info.value.reason == "version"


def test_the_error_is_picklable_and_names_no_secret(spool_dir):
    import pickle

    error = SpoolUnavailable("klime spool /x: full", "full", "/x", recovered=False)
    again = pickle.loads(pickle.dumps(error))
    assert (again.reason, again.path, str(again)) == ("full", "/x", "klime spool /x: full")


# --------------------------------------------------------------------------- inspect, clear


def test_inspect_and_clear(opened, spool_dir, tmp_path):
    with pytest.raises(SpoolUnavailable) as info:
        inspect(tmp_path / "nowhere")
    assert info.value.reason == "missing"
    os.makedirs(tmp_path / "empty")
    assert inspect(tmp_path / "empty").count == 0 and clear(tmp_path / "empty") == (0, 0)
    s = open_spool(opened, spool_dir)
    s.append([event("a"), event("b")])
    stats = inspect(spool_dir)
    assert (stats.count, stats.bytes, stats.alive_owners, stats.dead_owners) == (2, 2 * len(event("a")), 1, 0)
    assert stats.to_dict()["owners"][0]["pid"] == os.getpid()
    assert clear(spool_dir) == (2, 2 * len(event("a")))
    assert inspect(spool_dir).count == 0 and not s.claim(10)


# --------------------------------------------------------------------------- the model


class SpoolMachine(RuleBasedStateMachine):
    """Random append/claim/ack/release/reject/close/adopt/clock steps on two owners of one
    spool, against a model that predicts every answer; after each step every row appended
    is exactly one of pending, claimed, acked, rejected or dropped-by-cap, and the database
    holds exactly the pending and claimed ones, with the model's owner, schedule and state."""

    CAP = 3000

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="klime-spool-model-")
        self.now = 1000.0
        self.seq = 0
        self.rows: Dict[int, Dict[str, object]] = {}  # seq -> state, owner, due, attempts, size
        self.spools: Dict[str, Spool] = {}
        self.tokens: Dict[str, str] = {}
        self.batches: List[Tuple[str, Claimed]] = []
        self.dead: Set[str] = set()

    @initialize()
    def start(self) -> None:
        for name in ("a", "b"):
            self._open(name)

    def _open(self, name: str) -> None:
        spool = Spool.open(self.dir, max_bytes=self.CAP, clock=lambda: self.now)
        self.spools[name] = spool
        assert spool.owner is not None
        self.tokens[name] = spool.owner

    def teardown(self) -> None:
        for spool in self.spools.values():
            spool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _in(self, *states: str) -> List[int]:
        return sorted(s for s, r in self.rows.items() if r["state"] in states)

    @rule(who=st.sampled_from(["a", "b"]), pads=st.lists(st.integers(0, 500), max_size=5))
    def append(self, who: str, pads: List[int]) -> None:
        events = []
        for pad in pads:
            events.append((self.seq, event(f"m{self.seq}", pad)))
            self.seq += 1
        total = sum(int(self.rows[s]["size"]) for s in self._in("pending", "claimed"))  # type: ignore[call-overload]
        expected_drop: List[int] = []
        for seq, body in events:
            if len(body) > self.CAP:
                continue
            self.rows[seq] = {"state": "pending", "owner": self.tokens[who], "due": self.now, "attempts": 0}
            self.rows[seq]["size"] = len(body)
            total += len(body)
        if total > self.CAP:
            for seq in self._in("pending"):
                if self.rows[seq]["owner"] != self.tokens[who]:
                    continue  # only the appender's own rows make room
                expected_drop.append(seq)
                self.rows[seq]["state"] = "dropped"
                total -= int(self.rows[seq]["size"])  # type: ignore[call-overload]
                if total <= self.CAP:
                    break
        for seq, body in events:
            if len(body) > self.CAP:
                self.rows[seq] = {
                    "state": "dropped",
                    "owner": None,
                    "due": 0,
                    "attempts": 0,
                    "size": len(body),
                }
                expected_drop.append(seq)
        result = self.spools[who].append([b for _, b in events])
        assert [int(s[1:]) for s in seqs(result.dropped)] == expected_drop

    @rule(
        who=st.sampled_from(["a", "b"]),
        max_events=st.integers(1, 8),
        max_bytes=st.integers(1, 4000),
        include_waiting=st.booleans(),
    )
    def claim(self, who: str, max_events: int, max_bytes: int, include_waiting: bool) -> None:
        token = self.tokens[who]
        due = [
            s
            for s in self._in("pending")
            if self.rows[s]["owner"] == token and (include_waiting or float(self.rows[s]["due"]) <= self.now)  # type: ignore[arg-type]
        ]
        due.sort(key=lambda s: (self.rows[s]["due"], s))
        picked: List[int] = []
        size = len(b'{"batch":[]}')
        for s in due[:max_events]:
            n = int(self.rows[s]["size"]) + (1 if picked else 0)  # type: ignore[call-overload]
            if picked and size + n > max_bytes:
                break
            size += n
            picked.append(s)
        batch = self.spools[who].claim(max_events, max_bytes, include_waiting=include_waiting)
        assert [int(s[1:]) for s in seqs(batch.events)] == picked
        assert list(batch.attempts) == [self.rows[s]["attempts"] for s in picked]
        for s in picked:
            self.rows[s]["state"] = "claimed"
        if batch:
            self.batches.append((who, batch))

    @precondition(lambda self: self.batches)
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["ack", "reject", "release"]),
        delay=st.sampled_from([-5, 0, 3]),
    )
    def settle(self, data: st.DataObject, outcome: str, delay: float) -> None:
        who, batch = self.batches.pop(data.draw(st.integers(0, len(self.batches) - 1)))
        spool = self.spools[who]
        ids = [int(s[1:]) for s in seqs(batch.events)]
        if outcome == "release":
            assert spool.release(batch, retry_at=self.now + delay) == len(ids)
            for s in ids:
                self.rows[s].update(state="pending", due=self.now + delay)
                self.rows[s]["attempts"] = int(self.rows[s]["attempts"]) + 1  # type: ignore[call-overload]
        else:
            assert getattr(spool, outcome)(batch) == len(ids)
            for s in ids:
                self.rows[s]["state"] = "acked" if outcome == "ack" else "rejected"
        assert spool.ack(batch) == 0  # settled once only

    @rule()
    def b_dies(self) -> None:
        """b goes away (its lock is released) with whatever it holds; a new b opens."""
        self.batches = [(w, c) for w, c in self.batches if w != "b"]
        self.dead.add(self.tokens["b"])
        self.spools["b"].close()
        self._open("b")

    @rule(who=st.sampled_from(["a", "b"]))
    def adopt(self, who: str) -> None:
        token = self.tokens[who]
        moving = [s for s in self._in("pending", "claimed") if self.rows[s]["owner"] in self.dead]
        assert self.spools[who].adopt() == len(moving)
        for s in moving:
            self.rows[s].update(owner=token, state="pending", due=min(float(self.rows[s]["due"]), self.now))
        self.dead.clear()  # all adopted (an owner that left no rows left no trace)

    @rule(dt=st.sampled_from([0.5, 3.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def database_matches_the_model(self) -> None:
        conn = sqlite3.connect(os.path.join(self.dir, DB_NAME))
        try:
            rows = conn.execute(
                "SELECT e.body, o.token, e.claimed, e.due, e.attempts FROM events e"
                " LEFT JOIN owners o ON o.id = e.owner"
            ).fetchall()
            totals = conn.execute("SELECT count, bytes FROM totals").fetchone()
        finally:
            conn.close()
        actual = {int(json.loads(b)["messageId"][1:]): (o, bool(c), d, a) for b, o, c, d, a in rows}
        expected = {
            s: (r["owner"], r["state"] == "claimed", r["due"], r["attempts"])
            for s, r in self.rows.items()
            if r["state"] in ("pending", "claimed")
        }
        assert actual == expected
        assert totals == (len(rows), sum(len(b) for b, *_ in rows))
        assert totals[1] <= self.CAP or all(c for _, _, c, _, _ in rows)
        states = Counter(str(r["state"]) for r in self.rows.values())
        assert sum(states.values()) == self.seq  # every appended event is in exactly one state


TestSpoolModel = SpoolMachine.TestCase
TestSpoolModel.settings = settings(
    max_examples=int(os.environ.get("KLIME_SPOOL_EXAMPLES", "40")),
    stateful_step_count=int(os.environ.get("KLIME_SPOOL_STEPS", "40")),
    deadline=None,
    derandomize=not os.environ.get("KLIME_SPOOL_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- soak


@pytest.mark.slow
def test_soak_kill_and_adopt_repeatedly(tmp_path, spool_dir):
    """Ten rounds: an owner is SIGKILLed mid-stream while three adopters run; every row is
    delivered exactly once by the adopters (beyond those the owner certainly acknowledged)."""
    rounds = int(os.environ.get("KLIME_SPOOL_SOAK_ROUNDS", "10"))
    stop = tmp_path / "stop"
    adopters = [
        (tmp_path / f"a{i}.log", run_py(ADOPTER, spool_dir, str(tmp_path / f"a{i}.log"), str(stop), "240"))
        for i in range(3)
    ]
    owner_logs = []
    for r in range(rounds):
        path = tmp_path / f"o{r}.log"
        process = run_py(OWNER, spool_dir, f"o{r}", "3000", str(path))
        threshold = 200 + 250 * (r % 10)
        assert wait_until(lambda: log_count(path, "appended") >= threshold, timeout=DEADLINE)  # noqa: B023
        process.send_signal(signal.SIGKILL)
        process.wait(DEADLINE)
        owner_logs.append((f"o{r}", path))
    stop.touch()
    acks: Counter[str] = Counter()
    for path, process in adopters:
        assert finish(process, 240) == 0
        acks.update(Log(path).ids("acked"))
    assert all(n == 1 for n in acks.values())
    for name, path in owner_logs:
        log = Log(path)
        mine = {s for s in acks if s.startswith(name + "-")}
        acked = set(log.ids("acked"))
        assert not mine & acked
        assert set(log.ids("appended")) - acked - set(log.ids("acking")) <= mine
    assert rows_in(spool_dir) == 0


def test_threads_of_one_owner_share_it_safely(opened, spool_dir):
    s = open_spool(opened, spool_dir)
    claimed: Counter[str] = Counter()
    lock = threading.Lock()
    errors: List[BaseException] = []

    def work(t: int) -> None:
        try:
            for n in range(0, 500, 25):
                s.append([event(f"t{t}-{i}") for i in range(n, n + 25)])
                batch = s.claim(30)
                with lock:
                    claimed.update(seqs(batch.events))
                s.ack(batch)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(DEADLINE)
    assert not errors
    rest = s.claim(10_000)
    claimed.update(seqs(rest.events))
    assert len(claimed) == 2000 and set(claimed.values()) == {1}


def test_compact_gives_free_pages_back(opened, spool_dir):
    s = open_spool(opened, spool_dir)
    for n in range(0, 3000, 500):
        s.append([event(f"e{i}", pad=400) for i in range(n, n + 500)])
    path = os.path.join(spool_dir, DB_NAME)
    s._db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # type: ignore[union-attr]
    full = os.path.getsize(path)
    while True:
        batch = s.claim(100)
        if not batch:
            break
        s.ack(batch)
    assert s.compact(10) == 10
    freed = s.compact(100_000)
    assert freed > 200 and s.compact() == 0  # nothing (beyond the slack) left to free
    s._db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()  # type: ignore[union-attr]
    assert os.path.getsize(path) < full / 2
