"""klime.transports.spooled: the background transport with a durable spool, against the
real collector and real processes: events on disk before they are sent, an outage longer
than the retry window, shutdown and restart, a SIGKILLed worker, the byte cap, a corrupt
and an unusable spool, and 4 gunicorn workers through an outage."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

import klime
from conftest import WRITE_KEY, wait_until
from klime.devserver import Collector, Fault
from klime.spool import inspect
from klime.transports.spooled import SPOOL_WRITE_S, SpoolTransport


def balanced(stats: dict) -> bool:
    """The conservation law with a spool: events adopted from dead processes count in."""
    return (
        stats["tracked"] + stats["adopted"]
        == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]
    )


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def on_disk(directory: Path) -> int:
    """Events in the spool (0 until the spool exists: klime's thread creates it)."""
    return inspect(str(directory)).count if directory.is_dir() else 0


def test_the_option_selects_the_spool_transport(make_client, spool_dir):
    client = make_client(spool=str(spool_dir))
    assert isinstance(client.transport, SpoolTransport)
    assert client.stats()["spooled"] == 0 and client.stats()["adopted"] == 0


def test_spool_needs_the_background_transport(make_client, spool_dir):
    with pytest.raises(klime.ConfigurationError, match="background transport"):
        make_client(spool=str(spool_dir), transport="blocking")
    with pytest.raises(klime.ConfigurationError, match="spool_max_bytes"):
        make_client(spool_max_bytes=10 * 2**20)
    with pytest.raises(klime.ConfigurationError, match="spool_max_bytes"):
        make_client(spool=str(spool_dir), spool_max_bytes=1000)  # below the least allowed


def test_events_are_on_disk_before_they_are_sent(make_client, collector, spool_dir):
    collector.set_mode(Fault.blackhole())  # nothing can be sent: what is on disk stays there
    client = make_client(spool=str(spool_dir), flush_interval=60_000)
    for i in range(5):  # less than a batch: only the spooler moves them
        client.track("Durable", {"i": i}, user_id="u")
    assert wait_until(lambda: on_disk(spool_dir) == 5, 5 + 10 * SPOOL_WRITE_S)
    stats = client.stats()
    assert stats["spooled"] == 5 and stats["queued"] == 5 and balanced(stats)


def test_an_outage_longer_than_the_retry_window_loses_nothing(make_client, collector, spool_dir, on_error):
    client = make_client(
        spool=str(spool_dir), retry_max_attempts=2, retry_initial_delay=20, on_error=on_error
    )
    collector.set_mode(Fault.status_code(503))
    for i in range(120):
        client.track("Outage", {"i": i}, user_id="u")
    # each batch's two attempts run out, again and again: released to the spool each time
    assert wait_until(lambda: client.stats()["retries"] >= 12, 15), client.stats()
    stats = client.stats()
    assert stats["failed"] == 0 and on_error.calls == [] and stats["queued"] == 120, stats
    assert balanced(stats)
    collector.set_mode(None)  # back
    assert wait_until(lambda: len(set(collector.message_ids())) == 120, 30), client.stats()
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 120
    result = client.flush(timeout=10)
    assert result.unsent == 0, (
        result,
        client.stats(),
        client.transport.in_flight(),
        vars(client.transport).get("_retry_at"),
        inspect(str(spool_dir)),
    )
    stats = client.stats()
    assert stats["sent"] == 120 and stats["spooled"] == 0 and balanced(stats)
    assert inspect(str(spool_dir)).count == 0


def test_a_permanent_rejection_still_goes_to_on_error_and_leaves_the_spool(
    make_client, collector, spool_dir, on_error
):
    client = make_client(spool=str(spool_dir), on_error=on_error)
    collector.set_mode(Fault.status_code(400))
    for i in range(30):
        client.track("Refused", {"i": i}, user_id="u")
    client.flush(timeout=10)
    assert wait_until(lambda: len(on_error.events) == 30, 10)
    stats = client.stats()
    assert stats["failed"] == 30 and stats["spooled"] == 0 and balanced(stats)
    assert inspect(str(spool_dir)).count == 0


def test_a_callback_that_calls_flush_does_not_wait_for_itself(make_client, collector, spool_dir):
    """on_error runs on a sender thread; its flush returns at once (no disk write, no wait)
    with the memory queue's part unsent, and the events still go out afterwards."""
    box: dict = {}
    inner: list = []

    def on_error(error, events) -> None:
        start = time.monotonic()
        result = box["client"].flush(timeout=3)
        inner.append((time.monotonic() - start, result.unsent))

    client = make_client(spool=str(spool_dir), on_error=on_error, flush_interval=60_000)
    box["client"] = client
    collector.respond(Fault.status_code(400))  # the first request only: refused, reported
    client.track("Refused", user_id="u")
    assert client.flush(timeout=10).unsent == 0
    assert wait_until(lambda: inner, 10)
    took, unsent = inner[0]
    assert took < 1.0 and unsent == 0, inner
    client.track("Later", user_id="u")
    assert client.flush(timeout=10).unsent == 0
    assert [e["event"] for e in collector.events()] == ["Later"]
    assert balanced(client.stats())


def test_partial_failures_delete_every_row_and_report_only_the_rejected(
    make_client, collector, spool_dir, on_error
):
    client = make_client(spool=str(spool_dir), on_error=on_error, max_batch_size=10)
    collector.respond(Fault.partial(2, 5))
    for i in range(10):
        client.track("Partial", {"i": i}, user_id="u")
    assert client.flush(timeout=10).unsent == 0
    assert sorted(e["properties"]["i"] for e in on_error.events) == [2, 5]
    assert inspect(str(spool_dir)).count == 0 and balanced(client.stats())


def test_the_flush_interval_sends_a_partial_batch(make_client, collector, spool_dir):
    client = make_client(spool=str(spool_dir), flush_interval=100)
    client.track("Lonely", user_id="u")
    assert collector.wait_for_events(1, timeout=5)


def test_flush_during_an_outage_returns_with_the_events_still_spooled(make_client, collector, spool_dir):
    collector.set_mode(Fault.status_code(503))
    client = make_client(spool=str(spool_dir), retry_max_attempts=1)
    for i in range(40):
        client.track("Waiting", {"i": i}, user_id="u")
    result = client.flush(timeout=10)
    assert result.unsent == 40 and result.failed == 0 and not result.timed_out, result


def test_eight_threads_at_50ms_every_event_once_and_the_books_exact(
    make_client, collector, spool_dir, on_error
):
    collector.set_mode(Fault.slow(0.05))
    client = make_client(spool=str(spool_dir), on_error=on_error)  # every other option default
    per_thread, threads = 1500, 8
    barrier = threading.Barrier(threads)

    def produce(t: int) -> None:
        barrier.wait()
        for i in range(per_thread):
            client.track("Storm", {"t": t, "i": i}, user_id=f"user_{i % 50}")

    workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert client.flush(timeout=60).unsent == 0
    stats = client.stats()
    total = per_thread * threads
    assert stats["tracked"] == total and balanced(stats) and stats["queued"] == 0, stats
    dropped = stats["dropped"]  # the memory queue can overflow in a tight 8-thread burst
    assert wait_until(lambda: len(on_error.events) == dropped, 10)
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == stats["sent"] == total - dropped
    assert on_disk(spool_dir) == 0


SCRIPT = """
import sys, time, klime
client = klime.Client({key!r}, endpoint={url!r}, spool={spool!r}, flush_interval=100,
                      retry_max_attempts=1, exit_timeout=0.5)
for i in range({n}):
    client.track({name!r}, {{"i": i}}, user_id="u")
{ending}
print(client.stats(), flush=True)
"""


def run_script(src_env, **fields) -> subprocess.CompletedProcess:
    fields.setdefault("ending", "")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(key=WRITE_KEY, **fields)],
        env=src_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_events_left_at_exit_are_sent_by_the_next_process(collector, spool_dir, src_env):
    # the endpoint is down: the first process exits with its events on disk, not reported
    collector.set_mode(Fault.status_code(503))
    first = run_script(src_env, url=collector.url, spool=str(spool_dir), n=150, name="Before")
    assert inspect(str(spool_dir)).count == 150, first.stdout
    assert "events were not delivered" not in first.stderr
    collector.set_mode(None)
    # the next process of the same project (a deploy, a restart: same endpoint and key)
    # adopts them and sends them, once
    run_script(
        src_env,
        url=collector.url,
        spool=str(spool_dir),
        n=10,
        name="After",
        ending="assert client.flush(timeout=20).unsent == 0",
    )
    events = collector.events()
    assert sorted(e["properties"]["i"] for e in events if e["event"] == "Before") == list(range(150))
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 160
    assert inspect(str(spool_dir)).count == 0


KILLED = """
import os, sys, time, klime
client = klime.Client({key!r}, endpoint={url!r}, spool={spool!r}, retry_max_attempts=1,
                      retry_initial_delay=10)
ledger = open({ledger!r}, "a", buffering=1)
i = 0
while True:   # about 500 events/s until killed
    client.track("Killed", {{"i": i}}, user_id="u")
    ledger.write(f"{{i}} {{time.monotonic()}}\\n")
    i += 1
    if i % 5 == 0:
        time.sleep(0.01)
"""


def test_a_sigkilled_process_leaves_its_spooled_events_to_a_successor(
    collector, spool_dir, src_env, tmp_path
):
    collector.set_mode(Fault.status_code(503))  # nothing gets through before the kill
    ledger = tmp_path / "ledger"
    script = KILLED.format(key=WRITE_KEY, url=collector.url, spool=str(spool_dir), ledger=str(ledger))
    proc = subprocess.Popen([sys.executable, "-c", script], env=src_env, stderr=subprocess.PIPE)
    try:
        assert wait_until(lambda: ledger.exists() and len(ledger.read_text().splitlines()) > 1500, 30)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
    tracked = [line.split() for line in ledger.read_text().splitlines() if len(line.split()) == 2]
    old_enough = {int(i) for i, at in tracked if float(at) < killed_at - 2.0}  # > one flush_interval
    collector.set_mode(None)
    successor = klime.Client(WRITE_KEY, endpoint=collector.url, spool=str(spool_dir))
    try:
        assert successor.transport._queue.writer.spool() is not None  # type: ignore[attr-defined]
        successor.transport._queue.writer.adopt()  # type: ignore[attr-defined]  (the spooler does it every few s)
        assert successor.flush(timeout=30).unsent == 0
        stats = successor.stats()
    finally:
        successor.shutdown(timeout=5)
    arrived = [e["properties"]["i"] for e in collector.events()]
    assert len(arrived) == len(set(arrived)), "an event arrived twice"
    assert old_enough and old_enough <= set(arrived), sorted(old_enough - set(arrived))[:10]
    lost = len(tracked) - len(arrived)
    assert stats["adopted"] == len(arrived) and balanced(stats)
    # only the last moments before the kill may be missing (in memory, not yet on disk)
    assert lost <= 0.5 * 500, lost


def test_the_byte_cap_drops_the_oldest_counts_and_reports(make_client, collector, spool_dir, on_error):
    collector.set_mode(Fault.blackhole())
    client = make_client(
        spool=str(spool_dir), spool_max_bytes=2**20, on_error=on_error, flush_interval=60_000
    )
    pad = "x" * 50_000
    for i in range(60):  # 3 MB into a 1 MiB spool
        client.track("Big", {"i": i, "pad": pad}, user_id="u")
    assert wait_until(lambda: client.stats()["dropped"] >= 35, 15), client.stats()
    assert wait_until(lambda: len(on_error.events) == client.stats()["dropped"], 10)
    dropped = [e["properties"]["i"] for e in on_error.events]
    assert len(dropped) == len(set(dropped)) == client.stats()["dropped"]
    assert inspect(str(spool_dir)).bytes <= 2**20
    # the oldest go first; only what is in the air (claimed, stuck in the black hole) stays
    kept = set(range(60)) - set(dropped)
    in_air = {i for i in kept if i < max(dropped)}  # older than a dropped one: claimed, sending
    assert len(in_air) <= client.max_batch_size, sorted(in_air)
    assert all(i > max(dropped) for i in kept - in_air)
    assert balanced(client.stats())


def test_a_corrupt_spool_is_moved_aside_and_a_fresh_one_used(make_client, collector, spool_dir, caplog_klime):
    spool_dir.mkdir()
    (spool_dir / "spool.sqlite3").write_bytes(b"this is not a database" * 100)
    client = make_client(spool=str(spool_dir))
    for i in range(25):
        client.track("Fresh", {"i": i}, user_id="u")
    assert client.flush(timeout=10).unsent == 0
    assert len(collector.events()) == 25
    assert any(p.name.startswith("spool.sqlite3.corrupt-") for p in spool_dir.iterdir())
    assert "moved aside" in caplog_klime.text


def test_an_unusable_spool_falls_back_to_memory_with_one_warning(
    make_client, collector, tmp_path, caplog_klime
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    client = make_client(spool=str(blocker / "spool"))
    for i in range(45):
        client.track("Memory", {"i": i}, user_id="u")
    assert client.flush(timeout=10).unsent == 0
    assert len(collector.events()) == 45
    warnings = [r for r in caplog_klime.records if "cannot be used" in r.getMessage()]
    assert len(warnings) == 1 and "memory only" in warnings[0].getMessage()
    assert balanced(client.stats())


# ---------------------------------------------------------------------------------------
# 4 gunicorn workers, 100 events/s in all, through an outage longer than the retry window


OUTAGES = {
    # the whole retry window is about 0.1 s here: 3 s of refused connections, then 3 s of 503s
    # settle: a row released during the outage waits up to MAX_SPOOL_BACKOFF_S (60 s) before
    # it is tried again, so the wait for the last events must be longer than that
    "short": {"refused": 3.0, "failing": 3.0, "attempts": "2", "delay": "50", "settle": 120.0},
    # klime's default retry options (5 attempts, 1 s doubling: about 15 s), a minute down
    "minute": {"refused": 30.0, "failing": 30.0, "attempts": "5", "delay": "1000", "settle": 150.0},
}


@pytest.mark.parametrize(
    "outage",
    [pytest.param("short", marks=pytest.mark.slow), pytest.param("minute", marks=pytest.mark.soak)],
)
def test_gunicorn_workers_through_an_outage_deliver_everything_once(tmp_path, src_env, outage):
    from apps.process import servers

    plan = OUTAGES[outage]

    ledger = servers.Ledger(tmp_path / "ledger")
    port, collector_port = servers.free_port(), servers.free_port()
    spool = tmp_path / "spool"
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "--preload",
        "--workers",
        "4",
        "--threads",
        "2",
        "-k",
        "gthread",
        "--bind",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "20",
        "apps.process.wsgi_app:application",
    ]
    endpoint = f"http://127.0.0.1:{collector_port}"

    class _Later:  # the collector starts only later: its address is known now
        url, write_key = endpoint, WRITE_KEY

    env = servers.app_env(_Later(), ledger)  # type: ignore[arg-type]
    env.update(
        KLIME_TEST_SPOOL=str(spool),
        KLIME_TEST_RETRY_ATTEMPTS=str(plan["attempts"]),
        KLIME_TEST_RETRY_DELAY=str(plan["delay"]),
        KLIME_TEST_FLUSH_INTERVAL="200",
    )
    stop = threading.Event()
    failures: list = []

    def traffic() -> None:  # 100 events/s, spread over the workers by gunicorn
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/track?n=1", timeout=10) as r:
                    r.read()
            except Exception as exc:
                failures.append(exc)
            next_at += 0.01
            stop.wait(max(0.0, next_at - time.monotonic()))

    with servers.Server(argv, env, tmp_path / "server.log", port) as server:
        server.wait_ready(ledger, importers=1)
        sender = threading.Thread(target=traffic, daemon=True)
        sender.start()
        time.sleep(float(plan["refused"]))  # phase 1: the endpoint refuses connections
        with Collector(port=collector_port, write_key=WRITE_KEY) as collector:
            collector.set_mode(Fault.status_code(503))
            time.sleep(float(plan["failing"]))  # phase 2: it answers 503 to everything
            collector.set_mode(None)
            time.sleep(2)  # phase 3: back
            stop.set()
            sender.join(15)
            produced = ledger.produced()
            assert len(produced) >= 500, len(produced)
            settle = float(plan["settle"])
            assert collector.wait_for_events(len(produced), settle), (len(collector.events()), len(produced))
            assert server.stop(signal.SIGTERM) == 0, server.log()
            delivery = servers.check_delivery(collector, ledger, timeout=5)
    assert not failures, failures[:3]
    assert not delivery.missing, delivery.describe()
    assert not delivery.duplicated and len(delivery.message_ids) == len(set(delivery.message_ids))
    assert not delivery.errors, delivery.describe()  # nothing reported as failed
    assert inspect(str(spool)).count == 0
