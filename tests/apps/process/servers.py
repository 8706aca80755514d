"""Running real prefork servers (gunicorn, uWSGI) around ``wsgi_app`` for the tests.

- :func:`uwsgi_binary` builds (once, then cached under ``.venv/uwsgi-<version>/``, or under
  ``$KLIME_TEST_VENV/uwsgi-<version>/`` when set, as the test matrix does) a venv holding
  one uWSGI version: ``pip install uwsgi`` compiles it, ~20 s. Two versions cannot
  share a venv, and 2.0.26 is the last one whose Python threads are off by default.
- :class:`Ledger` reads what the app's processes say they tracked.
- :class:`Server` starts a server in its own process group and always reaps it.
- :func:`check_delivery` compares the ledger with what reached the collector.
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from klime.devserver import Collector

REPO = Path(__file__).resolve().parents[3]
TESTS = REPO / "tests"
SRC = REPO / "src"
#: Where the uWSGI builds are cached: this checkout's ``.venv`` unless ``KLIME_TEST_VENV``
#: names another (tools/test_matrix.py: one per interpreter, inside that interpreter's root).
VENV = Path(os.environ.get("KLIME_TEST_VENV") or REPO / ".venv")


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------
# uWSGI builds


def uwsgi_binary(version: str) -> Path:
    """The ``uwsgi`` command of ``version``, built into its own venv on first use.

    The venv holds uWSGI and ``requests`` (klime's dependency); klime itself comes from
    ``src`` through PYTHONPATH. Safe to call from several processes at once (file lock).
    """
    root = VENV / f"uwsgi-{version}"
    binary = root / "bin" / "uwsgi"
    ready = root / ".klime-ready"
    if ready.exists() and binary.exists():
        return binary
    VENV.mkdir(parents=True, exist_ok=True)
    with open(VENV / f".uwsgi-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready.exists() and binary.exists():
            return binary
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", "--clear", str(root)], check=True, capture_output=True)
        pip = [str(root / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        result = subprocess.run(
            [*pip, "install", f"uwsgi=={version}", "requests>=2.28", "urllib3>=2.0"],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building uWSGI {version} failed:\n{result.stdout}\n{result.stderr}")
        ready.touch()
    return binary


def build_uwsgi(versions: Sequence[str]) -> Dict[str, Path]:
    """Build several uWSGI versions in parallel (each build is mostly one compiler)."""
    results: Dict[str, Any] = {}

    def build(version: str) -> None:
        try:
            results[version] = uwsgi_binary(version)
        except BaseException as exc:  # reported below, in the caller's thread
            results[version] = exc

    threads = [threading.Thread(target=build, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    return dict(results)


# ---------------------------------------------------------------------------------------
# what the app produced


class Ledger:
    """The directory where the app's processes write ``<pid>.log`` (one tag per tracked
    event, written before tracking), ``<pid>.errors`` (on_error) and ``<pid>.ready``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)

    def _files(self, suffix: str) -> List[Path]:
        return sorted(p for p in self.path.iterdir() if p.name.endswith(suffix))

    def produced(self) -> List[str]:
        return [tag for p in self._files(".log") for tag in p.read_text().split()]

    def errors(self) -> List[str]:
        return [line for p in self._files(".errors") for line in p.read_text().splitlines()]

    def ready_pids(self) -> List[int]:
        return [int(p.name.split(".")[0]) for p in self._files(".ready")]

    def by_pid(self) -> Dict[int, List[str]]:
        out: Dict[int, List[str]] = collections.defaultdict(list)
        for tag in self.produced():
            out[int(tag.split("-")[1])].append(tag)
        return dict(out)


@dataclass
class Delivery:
    """What reached the collector, compared with the ledger."""

    produced: List[str]
    arrived: Dict[str, int]
    message_ids: List[str]
    errors: List[str]
    missing: List[str] = field(default_factory=list)
    duplicated: Dict[str, int] = field(default_factory=dict)
    unexpected: List[str] = field(default_factory=list)

    def of_pid(self, pid: int) -> List[str]:
        return [t for t in self.produced if t.split("-")[1] == str(pid)]

    def describe(self) -> str:
        return (
            f"produced={len(self.produced)} arrived={sum(self.arrived.values())} "
            f"missing={self.missing[:8]} duplicated={dict(list(self.duplicated.items())[:8])} "
            f"unexpected={self.unexpected[:8]} errors={self.errors[:4]}"
        )


def check_delivery(collector: Collector, ledger: Ledger, *, timeout: float = 15.0) -> Delivery:
    """Wait (up to ``timeout``) until every produced event arrived, then compare."""
    produced = ledger.produced()
    collector.wait_for_events(len(produced), timeout)
    events = collector.events()
    arrived = collections.Counter(str(e.get("properties", {}).get("tag")) for e in events)
    result = Delivery(produced, dict(arrived), collector.message_ids(), ledger.errors())
    produced_set = set(produced)
    result.missing = sorted(produced_set - set(arrived))
    result.duplicated = {t: n for t, n in arrived.items() if n > 1}
    result.unexpected = sorted(set(arrived) - produced_set)
    return result


# ---------------------------------------------------------------------------------------
# servers


class Server:
    """A server command in its own process group, with the app's environment.

    Use as a context manager: the whole group is SIGKILLed on exit if it is still there,
    whatever happened in the test.
    """

    def __init__(self, argv: Sequence[str], env: Dict[str, str], log: Path, port: int) -> None:
        self.argv = list(argv)
        self.env = env
        self.log_path = log
        self.port = port
        self.process: Optional[subprocess.Popen[bytes]] = None

    def __enter__(self) -> Server:
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(REPO),
        )
        return self

    def __exit__(self, *exc: Any) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(10)
        elif process is not None:
            try:  # workers left behind by a master that died
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as response:
            return json.loads(response.read())

    def wait_ready(self, ledger: Ledger, importers: int, timeout: float = 60.0) -> None:
        """Until ``importers`` processes imported the app and a request is answered."""

        def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            if len(ledger.ready_pids()) < importers:
                return False
            try:
                self.get("/", timeout=2)
                return True
            except OSError:
                return False

        if not wait_for(ready, timeout, interval=0.05):
            raise AssertionError(f"server not ready after {timeout}s:\n{self.log()}")

    def traffic(self, requests: int, events_per_request: int, concurrency: int = 2) -> List[Any]:
        """Send ``requests`` GET /track from ``concurrency`` threads; return the answers."""
        answers: List[Any] = []
        errors: List[BaseException] = []
        lock = threading.Lock()
        counter = iter(range(requests))

        def run() -> None:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                try:
                    answer = self.get(f"/track?n={events_per_request}")
                except BaseException as exc:
                    errors.append(exc)
                    return
                with lock:
                    answers.append(answer)

        threads = [threading.Thread(target=run) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        if errors:
            raise AssertionError(f"request failed: {errors[0]!r}\n{self.log()}")
        return answers

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` to the master and wait for it to exit; return its exit status."""
        assert self.process is not None
        os.kill(self.process.pid, sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not stop within {timeout}s after {sig}:\n{self.log()}")


def app_env(collector: Collector, ledger: Ledger, **extra: str) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("KLIME_ENDPOINT", "KLIME_WRITE_KEY", "AWS_LAMBDA_FUNCTION_NAME", "FUNCTION_TARGET"):
        env.pop(name, None)
    env.update(
        KLIME_ENDPOINT=collector.url,
        KLIME_WRITE_KEY=collector.write_key or "test-write-key",
        KLIME_TEST_LEDGER=str(ledger.path),
        PYTHONPATH=os.pathsep.join([str(SRC), str(TESTS)]),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.update(extra)
    return env


def uwsgi_stats(port: int) -> Dict[str, Any]:
    """uWSGI's stats server answer (``--stats 127.0.0.1:PORT``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return dict(json.loads(b"".join(chunks)))


def _running(pid: int) -> bool:
    """``pid`` is a live process here, not a zombie (Linux: /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def uwsgi_workers_idle(port: int, max_requests: Optional[int] = None) -> bool:
    """Every worker idle, running, accepting requests and (with ``--max-requests``) not
    about to be recycled: no respawn is due or under way.

    Stopping uWSGI then is what a test wants; stopping it during a respawn meets two races
    of uWSGI's own (seen in ``tests/test_uwsgi.py``'s max-requests case, one run in two
    under load): its stats list a worker that ended as idle, under its old pid, until the
    master respawns it, and a master told to stop while it waits to respawn ("respawning
    too fast": 2 s) respawns it after signalling the others; and a worker signalled before
    it has set its own handlers runs the master's (it prints "killing workers" a second
    time). Either way one worker never hears of the stop, and uWSGI waits for it for its
    whole reload mercy (60 s). ``accepting`` turns 1 once a new worker is set up."""
    try:
        workers = uwsgi_stats(port)["workers"]
    except (OSError, ValueError, KeyError):
        return False
    return all(
        w.get("status") == "idle"
        and int(w.get("pid") or 0) > 0
        and _running(int(w["pid"]))
        and w.get("accepting", 1) == 1
        and (max_requests is None or int(w.get("delta_requests") or 0) < max_requests)
        for w in workers
    )


def iter_pids(answers: Sequence[Any]) -> Iterator[int]:
    for answer in answers:
        yield int(answer["pid"])
