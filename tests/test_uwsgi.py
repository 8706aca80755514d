"""klime under real uWSGI servers: every event produced in every process arrives exactly once.

The app (tests/apps/process/wsgi_app.py) tracks 3 events at import — in the master unless
``--lazy-apps`` — to provoke the case where a sender thread running in the master when
uWSGI forks can hang a worker, then a few events per request, one request crossing a batch.
Each configuration is run once (module fixture) and checked by several tests.

uWSGI is built from source into ``.venv/uwsgi-<version>/`` on first use (see
``apps.process.servers.uwsgi_binary``), 2.0.31 and 2.0.26 in parallel: ~30 s once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from apps.process import servers
from apps.process.servers import Delivery, Ledger, Server
from conftest import WRITE_KEY
from klime import _lifecycle
from klime._deadline import Deadline
from klime._events import encode_track
from klime._logging import log
from klime.devserver import Collector
from klime.integrations import uwsgi as uwsgi_integration
from klime.senders import http as http_sender
from support.fake_resolver import HeldResolver
from support.hostile_server import HostileServer, answer, response

pytestmark = pytest.mark.slow

NEW, OLD = "2.0.31", "2.0.26"

@dataclass(frozen=True)
class Config:
    version: str
    flags: Tuple[str, ...]
    importers: int = 1  # processes that import the app
    env: Tuple[Tuple[str, str], ...] = ()

    @property
    def master(self) -> bool:
        return "--master" in self.flags


CONFIGS: Dict[str, Config] = {
    "default": Config(NEW, ("--master",)),
    "lazy-apps": Config(NEW, ("--master", "--lazy-apps"), importers=2),
    # klime's modules imported by the master, the clients made in the workers: each worker
    # must still draw its own messageIds (uWSGI runs no fork hook to re-seed them)
    "lazy-apps-import-in-master": Config(
        NEW, ("--master", "--lazy-apps", "--shared-import", "klime"), importers=2
    ),
    "py-call-osafterfork": Config(NEW, ("--master", "--py-call-osafterfork")),
    "max-requests": Config(NEW, ("--master", "--max-requests", "4")),
    "skip-atexit-teardown": Config(NEW, ("--master", "--skip-atexit-teardown")),
    # Without a master the importing process becomes worker 1 itself (no fork) and forks
    # worker 2: klime must re-arm it after its import-time events so that it starts its
    # thread. There is no stats server to tell when workers are idle (it would turn the
    # master on): the server is stopped once everything arrived, or after 5 s.
    "no-master": Config(NEW, (), env=(("KLIME_TEST_FLUSH_INTERVAL", "100"),)),
    # No logging configured by the app here: klime's own warning must reach uWSGI's log
    # through stderr (one line, naming the flag that fixes it).
    "2.0.26-threads-off": Config(OLD, ("--master",), env=(("KLIME_TEST_DEBUG", "0"),)),
}

REQUESTS, PER_REQUEST, BIG = 16, 3, 25


@dataclass
class Run:
    name: str
    master: int
    delivery: Delivery
    before_stop: List[str]  # tags that had arrived before the server was told to stop
    importer: int  # the process that imported the app (the master, except in no-master)
    answers: List[Any]
    log: str
    exit_code: int
    seconds: float


#: What uWSGI itself cannot do on this Python (measured by the test matrix: the same
#: happens with an app that has no klime in it).
UWSGI_LIMITS: Dict[str, str] = {}
if sys.version_info >= (3, 13):
    UWSGI_LIMITS[OLD] = "uWSGI 2.0.26 does not compile on Python 3.13+ (_PyCFrame is gone)"
    UWSGI_LIMITS["py-call-osafterfork"] = (
        "uWSGI calls PyOS_AfterFork_Child without PyOS_BeforeFork; on Python 3.13+ every "
        "worker aborts (Fatal Python error: PyMutex_Unlock), with or without klime"
    )


@pytest.fixture(scope="module")
def uwsgi_builds() -> Dict[str, Path]:
    return servers.build_uwsgi([v for v in (NEW, OLD) if v not in UWSGI_LIMITS])


@pytest.fixture(scope="module", params=list(CONFIGS))
def run(
    request: pytest.FixtureRequest, uwsgi_builds: Dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Run]:
    name = request.param
    config = CONFIGS[name]
    why = UWSGI_LIMITS.get(name) or UWSGI_LIMITS.get(config.version)
    if why:
        pytest.skip(why)
    base = tmp_path_factory.mktemp(f"uwsgi-{name}")
    ledger = Ledger(base / "ledger")
    port, stats = servers.free_port(), servers.free_port()
    binary = uwsgi_builds[config.version]
    argv = [
        str(binary),
        "--workers", "2",
        "--http-socket", f"127.0.0.1:{port}",
        "--module", "apps.process.wsgi_app:application",
        "--home", str(binary.parent.parent),
        "--die-on-term",
        "--min-worker-lifetime", "0",
        "--disable-logging",
        *(("--stats", f"127.0.0.1:{stats}") if config.master else ()),
        *config.flags,
    ]
    started = time.monotonic()
    with Collector(write_key=WRITE_KEY) as collector:
        env = servers.app_env(collector, ledger, **{"KLIME_TEST_DEBUG": "1", **dict(config.env)})
        with Server(argv, env, base / "server.log", port) as server:
            server.wait_ready(ledger, config.importers)
            answers = server.traffic(REQUESTS, PER_REQUEST)
            answers.append(server.get(f"/track?n={BIG}"))
            importer = ledger.ready_pids()[0]
            if not config.master:  # make sure the importer served requests (bounded)
                for _ in range(200):
                    if importer in servers.iter_pids(answers):
                        break
                    answers.append(server.get("/track?n=1"))
            # uWSGI skips every exit hook of a worker still inside a request when it is told
            # to die (a request counts until uWSGI's own after-request work is done, after
            # the client has its answer): stop only once the workers are idle.
            if config.master:
                flags = list(config.flags)
                recycle = int(flags[flags.index("--max-requests") + 1]) if "--max-requests" in flags else None
                assert servers.wait_for(lambda: servers.uwsgi_workers_idle(stats, recycle), 15), server.log()
            else:
                collector.wait_for_events(len(ledger.produced()), 5)
            before_stop = [str(e["properties"]["tag"]) for e in collector.events()]
            exit_code = server.stop(signal.SIGTERM if config.master else signal.SIGINT)
            # every exit hook has finished once the master is gone: nothing more is coming
            delivery = servers.check_delivery(collector, ledger, timeout=2)
            yield Run(
                name, server.pid, delivery, before_stop, importer, answers, server.log(), exit_code,
                time.monotonic() - started,
            )


def test_every_worker_event_arrives_exactly_once(run: Run) -> None:
    d = run.delivery
    imported_in_workers = run.name.startswith("lazy-apps") or run.name == "no-master"
    worker_tags = [t for t in d.produced if imported_in_workers or not t.startswith("import-")]
    assert len(worker_tags) >= REQUESTS * PER_REQUEST + BIG
    missing = [t for t in worker_tags if t not in d.arrived]
    assert not missing, d.describe()
    assert not d.duplicated, d.describe()
    assert not d.unexpected, d.describe()
    assert len(d.message_ids) == len(set(d.message_ids)), "a messageId arrived twice"
    assert not d.errors, d.describe()
    # a uWSGI worker-without-master leaves with its end code (30) on SIGINT
    assert run.exit_code == (0 if run.name != "no-master" else 30), run.log


def test_master_events_are_never_duplicated(run: Run) -> None:
    master_tags = run.delivery.of_pid(run.master)
    assert all(run.delivery.arrived.get(t, 0) <= 1 for t in master_tags), run.delivery.describe()


def test_master_events_arrive(run: Run) -> None:
    """Tracked in the master at import: sent at once there (the master runs no exit hook
    and its workers discard what they inherit), never again by a worker."""
    if run.name.startswith("lazy-apps"):
        pytest.skip("no master events with --lazy-apps (the app is imported in each worker)")
    if run.name == "no-master":
        pytest.skip("no master (the importer lives on as worker 1 and flushes at exit)")
    master_tags = run.delivery.of_pid(run.master)
    assert master_tags, "the app tracked nothing in the master"
    assert all(run.delivery.arrived.get(t, 0) == 1 for t in master_tags), run.delivery.describe()


def test_no_master_importer_sends_in_background(run: Run) -> None:
    """Without --master the importer becomes worker 1: once its import-time events are
    out, klime's post-fork hook re-arms it and it sends from its own thread."""
    if run.name != "no-master":
        pytest.skip("only without --master")
    assert run.importer in set(servers.iter_pids(run.answers)), "worker 1 served no request"
    assert set(run.delivery.produced) <= set(run.before_stop), run.delivery.describe()


def test_workers_were_forked_and_served(run: Run) -> None:
    pids = {int(a["pid"]) for a in run.answers}
    assert pids
    if run.name != "no-master":
        assert run.master not in pids
    if run.name == "max-requests":
        assert len(pids) > 2, "workers were not recycled"


def test_threads_off_sends_after_each_request_and_warns_once(run: Run) -> None:
    if run.name != "2.0.26-threads-off":
        assert "without Python threads" not in run.log
        return
    assert "Python threads support is disabled" in run.log
    assert run.log.count("uWSGI runs without Python threads") == 1, run.log
    line = next(line for line in run.log.splitlines() if "uWSGI runs without Python threads" in line)
    assert line.startswith("klime: ") and "--enable-threads" in line, line
    # no thread ran, yet every request's events were out before the stop (after-request hook)
    request_tags = [t for a in run.answers for t in a["tags"]]
    assert set(request_tags) <= set(run.before_stop), run.delivery.describe()


# ---------------------------------------------------------------------------------------
# klime.integrations.uwsgi against a stand-in ``uwsgi`` module (how hooks are chained)


@pytest.fixture
def fake_uwsgi(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    calls: List[str] = []
    module = types.SimpleNamespace(
        has_threads=0,
        worker_id=lambda: 1,
        atexit=lambda: calls.append("app atexit"),
        post_fork_hook=lambda: calls.append("app post_fork"),
        after_req_hook=lambda: calls.append("app after_req"),
        calls=calls,
    )
    monkeypatch.setitem(sys.modules, "uwsgi", module)  # type: ignore[arg-type]
    monkeypatch.delitem(sys.modules, "uwsgidecorators", raising=False)
    monkeypatch.setattr(http_sender, "_lookup_thread_check", None)  # install() sets it: undone after
    log.reset_once("uwsgi-threads")
    yield module
    log.reset_once("uwsgi-threads")


def test_install_outside_uwsgi_does_nothing() -> None:
    assert uwsgi_integration.install() is False


def test_install_chains_the_apps_own_hooks_once(fake_uwsgi: types.SimpleNamespace) -> None:
    assert uwsgi_integration.install() is True
    assert uwsgi_integration.install() is True  # idempotent: wrapped once
    for name in ("atexit", "post_fork_hook", "after_req_hook"):
        getattr(fake_uwsgi, name)()
    assert fake_uwsgi.calls == ["app atexit", "app post_fork", "app after_req"]


def test_no_after_request_hook_where_threads_run(fake_uwsgi: types.SimpleNamespace) -> None:
    fake_uwsgi.has_threads = 1
    original = fake_uwsgi.after_req_hook
    uwsgi_integration.install()
    assert fake_uwsgi.after_req_hook is original
    uwsgi_integration.install(flush_after_request=True)  # asked for: installed
    assert fake_uwsgi.after_req_hook is not original
    uwsgi_integration.install(flush_after_request=None)


@pytest.mark.parametrize(
    ("has_threads", "worker_id", "own_thread"),
    [
        (0, 1, False),  # no Python thread would ever run: on the caller's thread
        (1, 0, False),  # a master that will fork: no thread of ours may be running then
        (1, 1, True),
    ],
)
def test_a_name_look_up_runs_on_a_thread_only_where_threads_may_run(
    fake_uwsgi: types.SimpleNamespace,
    monkeypatch: pytest.MonkeyPatch,
    has_threads: int,
    worker_id: int,
    own_thread: bool,
) -> None:
    fake_uwsgi.has_threads = has_threads
    fake_uwsgi.worker_id = lambda: worker_id
    uwsgi_integration.install()
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    resolver = HeldResolver({"klime-test.invalid": "127.0.0.1"}).install(monkeypatch)
    resolver.release()
    ok = response(200, b'{"status":"ok","accepted":1,"failed":0,"errors":[]}')
    with HostileServer(answer(ok)) as server:
        sender = http_sender.HttpSender(
            WRITE_KEY, f"http://klime-test.invalid:{server.port}", allow_insecure_endpoint=True
        )
        assert sender.send([encode_track("E", {}, "u", None)], Deadline.after(5)).error is None
    expected = http_sender.LOOKUP_THREAD_NAME if own_thread else threading.current_thread().name
    assert resolver.look_ups_of("klime-test.invalid") == [expected]
    assert resolver.finish()


def test_uwsgidecorators_postfork_chain_is_used(
    fake_uwsgi: types.SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    decorators = types.SimpleNamespace(postfork_chain=[])
    monkeypatch.setitem(sys.modules, "uwsgidecorators", decorators)  # type: ignore[arg-type]
    hook = fake_uwsgi.post_fork_hook
    uwsgi_integration.install()
    uwsgi_integration.install()
    assert fake_uwsgi.post_fork_hook is hook
    assert decorators.postfork_chain == [uwsgi_integration._post_fork]


def test_hooks_flush_after_requests_and_at_exit(
    fake_uwsgi: types.SimpleNamespace, collector: Collector, make_client: Any
) -> None:
    client = make_client(flush_interval=60_000)  # creating it installs the hooks
    client.track("During Request", user_id="user-1")
    fake_uwsgi.after_req_hook()
    assert collector.wait_for_events(1, 5)
    client.track("Last", user_id="user-1")
    fake_uwsgi.atexit()
    assert collector.wait_for_events(2, 5)
    assert client._closed


def test_post_fork_rearms_the_importer_that_became_worker_1(
    fake_uwsgi: types.SimpleNamespace, make_client: Any
) -> None:
    """Without --master the importer becomes worker 1 without forking: its decision not to
    run a thread (taken as "master") is taken again once its queue is empty."""
    fake_uwsgi.has_threads = 1
    fake_uwsgi.worker_id = lambda: 0
    client = make_client(flush_interval=60_000)
    client.track("At Import", user_id="user-1")
    client.flush(timeout=5)  # what the send-at-once mode of a master does
    assert not uwsgi_integration._sending(client)
    fake_uwsgi.worker_id = lambda: 1
    fake_uwsgi.post_fork_hook()
    client.track("In Worker 1", user_id="user-1")
    assert client.stats()["tracked"] == 1  # a fresh start
    assert uwsgi_integration._sending(client)


@pytest.mark.parametrize("hook", ["post_fork_hook", "after_req_hook"])
def test_a_stop_signal_waits_until_klimes_hook_is_done(
    fake_uwsgi: types.SimpleNamespace, make_client: Any, monkeypatch: pytest.MonkeyPatch, hook: str
) -> None:
    """uWSGI's stop handlers run the exit hook from within the signal handler, on the
    interrupted thread. A SIGINT sent while klime's post-fork or after-request hook holds
    klime's own lock is held back until the hook is done: its handler (here a Python one,
    in the place of uWSGI's) finds the lock free."""
    fake_uwsgi.has_threads = 0  # the after-request hook is installed where no thread runs
    client = make_client(flush_interval=60_000)
    client.track("E", user_id="u")
    held_when_handled: List[bool] = []
    sent: List[bool] = []

    def stop_handler(signum: int, frame: Any) -> None:
        held_when_handled.append(lifecycle_lock().locked())

    def lifecycle_lock() -> Any:
        return _lifecycle._guard()

    real_clients = _lifecycle.clients

    def clients_sending_a_stop() -> Any:
        if threading.current_thread() is not threading.main_thread() or sent:
            return real_clients()  # another client's thread, or the stop is sent already
        sent.append(True)
        with lifecycle_lock():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # loop back-edges: where a Python handler would run
                pass
        return real_clients()

    monkeypatch.setattr(_lifecycle, "clients", clients_sending_a_stop)
    previous = signal.signal(signal.SIGINT, stop_handler)
    try:
        if hook == "post_fork_hook":
            fake_uwsgi.post_fork_hook()
        else:
            uwsgi_integration._after_request()  # what uWSGI's after_req_hook calls
        deadline = time.monotonic() + 5
        while not held_when_handled and time.monotonic() < deadline:
            time.sleep(0.001)  # the handler runs at the next bytecode boundary
    finally:
        signal.signal(signal.SIGINT, previous)
    assert sent == [True] and held_when_handled == [False]
