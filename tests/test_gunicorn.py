"""klime under a real ``gunicorn --preload``: every event of the master and of every worker
arrives exactly once — sync and gthread workers, stopped by SIGTERM, and recycled by
``--max-requests``.

The app (tests/apps/process/wsgi_app.py) is imported in the master, where it tracks 3
events, so the master's sender thread is running when gunicorn forks the workers.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from apps.process import servers
from apps.process.servers import Delivery, Ledger, Server
from conftest import WRITE_KEY
from klime.devserver import Collector

pytestmark = pytest.mark.slow

CONFIGS: Dict[str, Tuple[str, ...]] = {
    "sync": ("-k", "sync"),
    "gthread": ("-k", "gthread", "--threads", "4"),
    "sync-max-requests": ("-k", "sync", "--max-requests", "4"),
    "gthread-max-requests": ("-k", "gthread", "--threads", "4", "--max-requests", "4"),
}

REQUESTS, PER_REQUEST, BIG = 16, 3, 25


@dataclass
class Run:
    name: str
    master: int
    delivery: Delivery
    answers: List[Any]
    infos: List[Any]
    log: str
    exit_code: int
    seconds: float


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    name = request.param
    base = tmp_path_factory.mktemp(f"gunicorn-{name}")
    ledger = Ledger(base / "ledger")
    port = servers.free_port()
    argv = [
        sys.executable, "-m", "gunicorn",
        "--preload",
        "--workers", "2",
        "--bind", f"127.0.0.1:{port}",
        "--graceful-timeout", "20",
        *CONFIGS[name],
        "apps.process.wsgi_app:application",
    ]
    started = time.monotonic()
    with Collector(write_key=WRITE_KEY) as collector:
        env = servers.app_env(collector, ledger)
        with Server(argv, env, base / "server.log", port) as server:
            server.wait_ready(ledger, importers=1)
            answers = server.traffic(REQUESTS, PER_REQUEST)
            answers.append(server.get(f"/track?n={BIG}"))
            infos = [server.get("/info") for _ in range(4)]
            exit_code = server.stop(signal.SIGTERM)
            # every exit hook has finished once the master is gone: nothing more is coming
            delivery = servers.check_delivery(collector, ledger, timeout=2)
            seconds = time.monotonic() - started
            yield Run(name, server.pid, delivery, answers, infos, server.log(), exit_code, seconds)


def test_every_event_arrives_exactly_once(run: Run) -> None:
    d = run.delivery
    assert len(d.produced) >= 3 + REQUESTS * PER_REQUEST + BIG
    assert not d.missing, d.describe()
    assert not d.duplicated, d.describe()
    assert not d.unexpected, d.describe()
    assert len(d.message_ids) == len(set(d.message_ids)), "a messageId arrived twice"
    assert not d.errors, d.describe()
    assert run.exit_code == 0, run.log


def test_master_events_arrive_once(run: Run) -> None:
    tags = run.delivery.of_pid(run.master)
    assert len(tags) == 3
    assert all(run.delivery.arrived.get(t) == 1 for t in tags), run.delivery.describe()


def test_workers_run_their_own_sender_thread(run: Run) -> None:
    pids = set(servers.iter_pids(run.answers))
    assert run.master not in pids
    if run.name.endswith("max-requests"):
        assert len(pids) > 2, "workers were not recycled"
    for info in run.infos:
        if info["stats"]["tracked"]:
            assert "klime-sender" in info["threads"], info
            stats = info["stats"]
            assert stats["tracked"] == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"]


def test_log_has_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.log, run.log
