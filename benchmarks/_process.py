"""Running one benchmark worker process, for ``run.py`` and ``roundtrip.py``: its
environment (:func:`worker_env`) and its run (:func:`run_worker`).

A worker script is started with ``<mode> <sdk> <spec as JSON>`` in a session of its own,
writes its result as JSON to the path given in ``spec["out"]``, and is killed (its whole
process group) when it outlives its timeout. The exit is seen by a blocking wait on a
thread, so its time (``exit_ns``) is the moment the process ended, not that of a poll.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional


class BenchError(RuntimeError):
    """A benchmark run could not be measured (a worker failed, a peer is missing...)."""


def worker_env(src: Optional[str]) -> Dict[str, str]:
    """A worker's environment: the klime of ``src`` first on the path (None: nothing of a
    checkout, for klime 1.1.0, which has this project's import name); nothing that would
    change an SDK's behaviour (serverless markers, SDK settings, proxies, warnings, dev
    mode); bytecode caching on."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("KLIME_", "POSTHOG_", "SEGMENT_", "AWS_LAMBDA_"))
        and k.upper() not in ("FUNCTION_TARGET", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
        and k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONPROFILEIMPORTTIME", "PYTHONWARNINGS", "PYTHONDEVMODE")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    if src is None:
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class WorkerRun:
    result: Dict[str, Any]
    stderr: str
    exit_ns: int  # time.monotonic_ns() when the parent saw the process end


def run_worker(
    script: str,
    mode: str,
    sdk: str,
    spec: Dict[str, Any],
    workdir: str,
    timeout: float,
    env: Dict[str, str],
    python: Optional[str] = None,
) -> WorkerRun:
    """Run ``script`` as one worker process to completion (killed with its process group
    and reaped after ``timeout`` seconds); ``python`` is its interpreter (default: this
    one). Raises BenchError, with the ends of its output, when it fails."""
    tag = f"{mode}-{sdk}-{time.monotonic_ns()}"
    out = os.path.join(workdir, tag + ".json")
    spec = dict(spec, out=out, bench_dir=os.path.dirname(os.path.abspath(script)))
    out_path = os.path.join(workdir, tag + ".out")
    err_path = os.path.join(workdir, tag + ".err")
    with open(out_path, "wb") as so, open(err_path, "wb") as se:
        proc = subprocess.Popen(
            [python or sys.executable, script, mode, sdk, json.dumps(spec)],
            stdout=so,
            stderr=se,
            stdin=subprocess.DEVNULL,
            cwd=workdir,
            env=env,
            start_new_session=True,
        )
    exited: Dict[str, int] = {}

    def reap() -> None:  # a blocking waitpid: the exit is seen at once, not at a poll
        proc.wait()
        exited["ns"] = time.monotonic_ns()

    reaper = threading.Thread(target=reap, name="bench-reaper", daemon=True)
    reaper.start()
    reaper.join(timeout)
    timed_out = reaper.is_alive()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also anything the worker left behind
    except (ProcessLookupError, PermissionError):
        pass
    reaper.join()
    with open(err_path, "rb") as fh:
        stderr = fh.read().decode("utf-8", "replace")
    if timed_out or proc.returncode != 0 or not os.path.exists(out):
        why = f"timed out after {timeout:g}s" if timed_out else f"exit status {proc.returncode}"
        with open(out_path, "rb") as fh:
            stdout = fh.read()[-1500:].decode("utf-8", "replace")
        raise BenchError(
            f"{mode} worker for {sdk} failed ({why}); stderr ends with:\n{stderr[-3000:]}\nstdout:\n{stdout}"
        )
    with open(out, encoding="utf-8") as fh:
        result: Dict[str, Any] = json.load(fh)
    return WorkerRun(result, stderr, exited["ns"])
