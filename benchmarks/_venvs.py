"""Interpreters of their own for what cannot run in this checkout's virtual environment.

Klime's previous SDK, ``klime`` 1.1.0 on PyPI, has the same distribution and import name
as this project, so it cannot share a venv with it: the benchmarks run it with the
interpreter of a venv of its own, ``klime-1.1.0-py<X.Y>``, that holds ``klime==1.1.0``
and nothing else (it is stdlib only). The cold-start benchmark also needs this klime in a
venv as lean as a user's: ``klime-deps-py<X.Y>`` holds only klime's runtime dependencies
(``requests`` and ``urllib3``, at the versions this venv has), and klime itself comes from
this checkout's ``src`` on ``PYTHONPATH``; the development venv's ``.pth`` files (editable
installs, namespace packages) would otherwise add 10-40 ms to every process start.

Both are created on demand (``python -m venv`` from this interpreter's base, then ``pip
install`` from the package index, about 10 s) in a cache directory outside the repository:
``$KLIME_BENCH_CACHE``, else ``$XDG_CACHE_HOME/klime-bench``, else ``~/.cache/klime-bench``.
Nothing is added to the repository. A venv is built in a temporary directory and renamed
into place once it imports what it should, under a file lock, so two benchmarks started
at once neither build it twice nor see it half-built.

Blocking (creation runs pip); not meant for threads.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

KLIME11_VERSION = "1.1.0"
#: pip's own limits, so that a machine without the package index fails fast, not after minutes.
_PIP_NET = ("--timeout", "15", "--retries", "1")
_PIP_LIMIT_S = 300.0
_READY = ".klime-bench-ready"


class Unavailable(RuntimeError):
    """The interpreter could not be found or made; the message says why."""


@dataclass
class Interpreter:
    python: str  # path of the interpreter
    version: str  # what the probe reported (the package's version)
    where: str  # the venv directory (or "given" for --klime11-python)


def add_klime11_options(parser: argparse.ArgumentParser) -> None:
    """The command-line options of the klime 1.1.0 peer, the same in every benchmark."""
    parser.add_argument(
        "--klime11-python",
        metavar="PATH",
        help="run klime 1.1.0 with this interpreter (it must import klime 1.1.0) instead of the cached venv",
    )
    parser.add_argument(
        "--no-create-venvs",
        action="store_true",
        help="do not create klime 1.1.0's venv when it is missing (skip that peer instead)",
    )


def cache_dir() -> Path:
    """Where the benchmark venvs live (outside the repository)."""
    explicit = os.environ.get("KLIME_BENCH_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "klime-bench"


def _tag() -> str:
    return f"py{sys.version_info[0]}.{sys.version_info[1]}"


def _scrubbed_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _probe(python: str, code: str) -> str:
    """Run ``code`` (which prints one line) with ``python``; its output, or Unavailable."""
    try:
        done = subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            timeout=60,
            env=_scrubbed_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise Unavailable(f"{python} does not run: {exc}") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise Unavailable(f"{python} -c ... failed: {last}")
    return done.stdout.strip()


_KLIME11_PROBE = "import klime, sys; from klime import KlimeClient; print(klime.__version__)"


def klime11(python: Optional[str] = None, *, create: bool = True) -> Interpreter:
    """An interpreter that imports ``klime`` 1.1.0: ``python`` if given (checked), else the
    cached venv, made now if it is missing and ``create`` is true. Raises Unavailable."""
    if python:
        version = _probe(python, _KLIME11_PROBE)
        if version != KLIME11_VERSION:
            raise Unavailable(f"{python} imports klime {version}, not {KLIME11_VERSION}")
        return Interpreter(python, version, "given")
    return _venv(f"klime-{KLIME11_VERSION}-{_tag()}", [f"klime=={KLIME11_VERSION}"], _KLIME11_PROBE, create)


def _installed(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def klime_deps(*, create: bool = True) -> Interpreter:
    """An interpreter with klime's runtime dependencies only (pinned to this venv's
    versions), for this checkout's klime on ``PYTHONPATH``. Raises Unavailable."""
    reqs = []
    for dist in ("requests", "urllib3"):
        version = _installed(dist)
        reqs.append(f"{dist}=={version}" if version else dist)
    probe = "import requests, urllib3; print(requests.__version__)"
    return _venv(f"klime-deps-{_tag()}", reqs, probe, create)


def _venv(name: str, requirements: List[str], probe: str, create: bool) -> Interpreter:
    root = cache_dir()
    target = root / name
    python = str(target / "bin" / "python")
    marker = target / _READY
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == requirements:
                return Interpreter(python, _probe(python, probe), str(target))
        except (ValueError, OSError, Unavailable):
            pass  # stale or broken: rebuilt below
    if not create:
        raise Unavailable(f"no venv at {target} (run without --no-create-venvs to make it)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if marker.exists():  # another process made it meanwhile
            try:
                if json.loads(marker.read_text()) == requirements:
                    return Interpreter(python, _probe(python, probe), str(target))
            except (ValueError, OSError, Unavailable):
                pass
        return _build(target, requirements, probe)


def _build(target: Path, requirements: List[str], probe: str) -> Interpreter:
    building = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    base = getattr(sys, "_base_executable", None) or sys.executable
    steps = [
        [base, "-m", "venv", str(building)],
        [str(building / "bin" / "python"), "-m", "pip", "install", "--quiet", *_PIP_NET, *requirements],
    ]
    try:
        for step in steps:
            try:
                done = subprocess.run(
                    step,
                    capture_output=True,
                    text=True,
                    timeout=_PIP_LIMIT_S,
                    env=_scrubbed_env(),
                    stdin=subprocess.DEVNULL,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise Unavailable(f"{' '.join(step[1:4])} took over {_PIP_LIMIT_S:g} s") from None
            if done.returncode != 0:
                lines = [x for x in (done.stderr or done.stdout).strip().splitlines() if x.strip()]
                why = lines[-1] if lines else f"exit status {done.returncode}"
                raise Unavailable(f"`{' '.join(step[2:])}` failed: {why}")
        version = _probe(str(building / "bin" / "python"), probe)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(building, target)  # bin/python links to the base interpreter: still valid
        (target / _READY).write_text(json.dumps(requirements))
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return Interpreter(str(target / "bin" / "python"), version, str(target))


if __name__ == "__main__":  # make (or show) both: python benchmarks/_venvs.py
    for make in (klime11, klime_deps):
        try:
            found = make()
            print(f"{make.__name__}: {found.python} ({found.version})")
        except Unavailable as exc:
            print(f"{make.__name__}: unavailable: {exc}")
