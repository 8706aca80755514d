#!/usr/bin/env python3
"""The test matrix: the whole suite on every CPython that Debian's packages give this machine.

    make test-matrix                          # every target below
    python3 tools/test_matrix.py --only 3.13,3.13t --json matrix.json --markdown matrix.md
    python3 tools/test_matrix.py --list       # the targets, and whether their roots are cached
    python3 tools/test_matrix.py --survey     # what each cached suite's apt-cache offers
    python3 tools/test_matrix.py --only 3.9 --command 'python -c "import sys; print(sys.version)"'

Interpreters come from Debian only: the host's own ``python3`` (the one running this
script), and ``python3.X`` packages of other Debian suites, each installed with
``debootstrap`` into a root cached outside the checkout (``$KLIME_MATRIX_CACHE``, default
``/var/cache/klime-matrix/<suite>``). Their glibc is newer than the host's, so they run
inside their root through ``chroot``, with ``/proc``, ``/sys``, ``/dev`` (``/dev/shm``
included, for multiprocessing) and this checkout bind-mounted at the same path, so an
editable install and every path the tests print mean the same inside and out.

Debian ships no free-threaded CPython (no ``python3.13-nogil``/``python3.14t`` in any suite,
experimental included), so ``3.13t`` is built here, once, with ``--disable-gil`` from the
upstream tarball of Debian 13's own ``python3.13`` source package (``apt-get source``),
inside the trixie root, and cached there (``3.14t`` would do the same from unstable's
``python3.14`` source, which this machine's mirror does not serve). It runs with
``PYTHON_GIL=0`` (an extension module that does not declare free-threading support cannot
switch the GIL back on) and with the concurrency-heavy tests scaled up (``--stress`` does
the same on any interpreter).

Per target: a venv inside the root (one per checkout), ``pip install -e ".[dev]"`` (when a
dev dependency does not install there, the rest are installed one by one and the missing
ones are named), then ``python -m pytest -q`` with the uWSGI builds of the tests kept in
that venv (``KLIME_TEST_VENV``). One line per interpreter::

    matrix: <sys.version> free-threading yes|no: N passed, M failed, K skipped

(``failed`` counts pytest's failures and errors). Full logs go to ``<cache>/logs/``.
Needs root (debootstrap, mount, chroot). Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("KLIME_MATRIX_CACHE") or "/var/cache/klime-matrix")
MIRROR = os.environ.get("KLIME_MATRIX_MIRROR") or "http://deb.debian.org/debian"
SECURITY = os.environ.get("KLIME_MATRIX_SECURITY_MIRROR") or "http://deb.debian.org/debian-security"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The host's CA bundle, copied into each root: pip there must trust what the host trusts.
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
ROOT_CA = "/etc/ssl/certs/klime-matrix-host-ca.crt"
#: Inside each root: one venv per (target, checkout).
VENVS = "/opt/klime-matrix"

#: The concurrency-heavy tests, scaled up under a free-threaded build (or --stress).
#: (tests/test_transports_background.py reads KLIME_STORM_EVENTS per thread and KLIME_STORM_THREADS.)
STRESS_ENV = {
    "KLIME_STATEFUL_EXAMPLES": "150",
    "KLIME_STATEFUL_STEPS": "40",
    "KLIME_SOAK_EVENTS": "40000",
    "KLIME_SOAK_RATE": "10000",
    "KLIME_STORM_EVENTS": "20000",
    "KLIME_STORM_THREADS": "16",
}

#: libcrypt-dev: uWSGI links -lcrypt, and since glibc 2.38 (sid) libc6-dev no longer pulls it in
#: failing tests named per target on stdout (all of them in --json/--markdown)
MAX_LISTED = 12

BASE_PACKAGES = ("ca-certificates", "build-essential", "libcrypt-dev")
#: what a --disable-gil build of CPython needs for the stdlib modules the suite uses
FREE_THREADED_BUILD_DEPS = (
    "dpkg-dev",
    "xz-utils",
    "pkg-config",
    "libssl-dev",
    "libffi-dev",
    "zlib1g-dev",
    "libbz2-dev",
    "liblzma-dev",
    "libsqlite3-dev",
    "libreadline-dev",
    "libgdbm-dev",
    "uuid-dev",
    "libexpat1-dev",
    "libmpdec-dev",
    "libzstd-dev",
    # few dev dependencies ship wheels for a free-threaded build; awslambdaric's sdist needs
    # cmake and autotools. (Rust sdists -- pydantic-core, hypothesis' newest -- cannot build
    # here at all: cargo needs crates.io, which this machine cannot reach.)
    "cmake",
    "autoconf",
    "automake",
    "libtool",
)


@dataclass(frozen=True)
class Suite:
    name: str
    #: debootstrap script (debootstrap 1.0.128 has none for forky)
    script: str
    #: stable suites get their -updates and -security archives too
    stable: bool
    #: environment for everything run in the root
    env: Tuple[Tuple[str, str], ...] = ()


SUITES: Dict[str, Suite] = {
    "bullseye": Suite("bullseye", "bullseye", True),
    "bookworm": Suite("bookworm", "bookworm", True),
    "trixie": Suite("trixie", "trixie", True),
    # GCC 15 and newer compile C23 by default, where uWSGI 2.0.x's signal handlers are type
    # errors ("passing argument 2 of 'signal' from incompatible pointer type")
    "forky": Suite("forky", "sid", False, (("CFLAGS", "-std=gnu17"),)),
    "sid": Suite("sid", "sid", False, (("CFLAGS", "-std=gnu17"),)),
}


@dataclass(frozen=True)
class Target:
    name: str
    suite: Optional[str]  # None: the host itself
    python: str  # the interpreter, inside its root
    packages: Tuple[str, ...] = ()
    #: built here with --disable-gil from this Debian source package (``apt-get source``)
    source: Optional[str] = None
    note: str = ""

    @property
    def build_free_threaded(self) -> bool:
        return self.source is not None

    @property
    def free_threaded(self) -> bool:
        return self.source is not None

    @property
    def prefix(self) -> str:
        return f"/opt/klime-{self.source}t"


def _debian_python(version: str) -> Tuple[str, ...]:
    return (f"python{version}", f"python{version}-dev", f"python{version}-venv")


TARGETS: Dict[str, Target] = {
    t.name: t
    for t in (
        Target("3.9", "bullseye", "python3.9", _debian_python("3.9"), note="Debian 11 (oldoldstable, LTS)"),
        Target("host", None, "", note="this machine's own python3 (the one running this tool)"),
        Target("3.13", "trixie", "python3.13", _debian_python("3.13"), note="Debian 13 (stable)"),
        Target("3.14", "sid", "python3.14", _debian_python("3.14"), note="Debian unstable"),
        Target("3.15", "sid", "python3.15", _debian_python("3.15"), note="Debian unstable"),
        Target(
            "3.13t",
            "trixie",
            "/opt/klime-python3.13t/bin/python3.13t",
            FREE_THREADED_BUILD_DEPS,
            source="python3.13",
            note="built here with --disable-gil from Debian 13's python3.13 source package",
        ),
        Target(
            "3.14t",
            "sid",
            "/opt/klime-python3.14t/bin/python3.14t",
            FREE_THREADED_BUILD_DEPS,
            source="python3.14",
            note="as 3.13t, from unstable's python3.14 source (not served by this machine's mirror)",
        ),
    )
}
#: 3.9 (Debian 11) stays defined but is not run: it is below klime's floor (requires-python
#: >= 3.11: 3.9 reached its end of life in 2025, and klime[aws] cannot even be installed on
#: it, botocore pinning urllib3 < 1.27 there). See docs/python-versions.md.
DEFAULT_TARGETS = ["host", "3.13", "3.13t", "3.14", "3.15"]


def log(message: str) -> None:
    print(f"[matrix {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, **kwargs)


# ---------------------------------------------------------------------------------------
# roots and mounts


def _mountpoints() -> List[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), raw))
    return points


def _mounted_under(root: Path) -> List[str]:
    prefix = str(root).rstrip("/") + "/"
    return [p for p in _mountpoints() if p.startswith(prefix)]


class Root:
    """One Debian suite under ``CACHE/<suite>``; ``with root.mounted():`` runs things in it."""

    def __init__(self, suite: Suite) -> None:
        self.suite = suite
        self.path = CACHE / suite.name
        self.ready = self.path / ".klime-matrix-ready"

    def host_path(self, inner: str) -> Path:
        return self.path / inner.lstrip("/")

    # -- creation ----------------------------------------------------------------------

    def _sources(self, sources: bool) -> str:
        name = self.suite.name
        lines = [f"deb {MIRROR} {name} main"]
        if self.suite.stable:
            lines.append(f"deb {MIRROR} {name}-updates main")
            lines.append(f"deb {SECURITY} {name}-security main")
        if sources:
            lines += [line.replace("deb ", "deb-src ", 1) for line in lines]
        return "\n".join(lines) + "\n"

    def _configure(self, sources: bool) -> None:
        (self.path / "etc/apt/sources.list").write_text(self._sources(sources))
        # testing/unstable snapshots of a mirror expire (Valid-Until) long before they are
        # replaced; the packages are still the signed ones.
        (self.path / "etc/apt/apt.conf.d/99klime-matrix").write_text(
            'Acquire::Check-Valid-Until "false";\nAPT::Install-Recommends "false";\n'
        )
        policy = self.path / "usr/sbin/policy-rc.d"  # never start services inside the root
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        self.copy_host_files()

    def copy_host_files(self) -> None:
        """The host's resolver and CA bundle: the root's network is the host's."""
        target = self.path / "etc/resolv.conf"
        if target.is_symlink():
            target.unlink()
        shutil.copyfile("/etc/resolv.conf", target)
        if os.path.exists(HOST_CA):
            (self.path / ROOT_CA.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA, self.path / ROOT_CA.lstrip("/"))

    def installed(self) -> List[str]:
        try:
            return self.ready.read_text().split()
        except OSError:
            return []

    def ensure(self, packages: Sequence[str], refresh: bool = False, sources: bool = False) -> None:
        """Create the root when missing; install what ``packages`` adds; refresh on demand.
        ``sources``: also the deb-src archives (for ``apt-get source``)."""
        wanted = set(BASE_PACKAGES) | set(packages) | ({"deb-src"} if sources else set())
        have = set(self.installed())
        if have and not refresh and wanted <= have:
            self.copy_host_files()
            return
        bootstrapped = (self.path / "usr/bin/apt-get").exists() and not (self.path / "debootstrap").exists()
        if not bootstrapped:
            if self.path.exists():
                self.remove()  # a debootstrap that did not finish
            self._debootstrap()
            have = set()
        self._configure(sources="deb-src" in wanted | have)
        missing = wanted - have
        install = sorted((wanted | have) - {"deb-src"})
        with self.mounted(repo=False):
            # an install an earlier run was stopped in the middle of
            self.sh("DEBIAN_FRONTEND=noninteractive dpkg --configure -a", quiet=True)
            log(f"{self.suite.name}: apt-get update")
            self.sh("apt-get update -q", quiet=True)
            if refresh:
                log(f"{self.suite.name}: apt-get dist-upgrade")
                self.sh("DEBIAN_FRONTEND=noninteractive apt-get -y -q dist-upgrade", quiet=True)
            if missing or refresh:
                log(f"{self.suite.name}: apt-get install {' '.join(install)}")
                self.sh(
                    "DEBIAN_FRONTEND=noninteractive apt-get install -y -q " + " ".join(install), quiet=True
                )
                self.sh("apt-get clean", quiet=True)
        self.ready.write_text("\n".join(sorted(wanted | have)) + "\n")

    def _debootstrap(self) -> None:
        if shutil.which("debootstrap") is None:
            log("installing debootstrap on the host (apt-get)")
            run(["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
            run(["apt-get", "install", "-y", "-q", "debootstrap"], stdout=subprocess.DEVNULL)
        script = Path("/usr/share/debootstrap/scripts") / self.suite.script
        log(f"{self.suite.name}: debootstrap --variant=minbase into {self.path} (about a minute)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        result = run(
            [
                "debootstrap",
                "--variant=minbase",
                "--include=ca-certificates",
                self.suite.name,
                str(self.path),
                MIRROR,
                str(script),
            ],
            check=False,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap {self.suite.name} failed:\n{result.stdout[-4000:]}")
        log(f"{self.suite.name}: debootstrap done in {time.monotonic() - started:.0f} s")

    def remove(self) -> None:
        mounted = _mounted_under(self.path)
        if mounted:
            raise RuntimeError(f"refusing to remove {self.path}: still mounted: {mounted}")
        log(f"removing {self.path}")
        shutil.rmtree(self.path)

    # -- running inside ----------------------------------------------------------------

    @contextlib.contextmanager
    def mounted(self, repo: bool = True) -> Iterator[None]:
        """/proc, /sys, /dev (with /dev/shm and /dev/pts) and, with ``repo``, this checkout
        at the same path; everything we mounted is unmounted again, whatever happens."""
        ours: List[Path] = []
        plan = [("/proc", ["--bind"]), ("/sys", ["--rbind"]), ("/dev", ["--rbind"])]
        if repo:
            plan.append((str(REPO), ["--bind"]))
        try:
            for source, how in plan:
                target = self.host_path(source)
                if str(target) in _mountpoints():
                    continue  # left by an earlier run that was killed: reuse it
                target.mkdir(parents=True, exist_ok=True)
                run(["mount", *how, source, str(target)])
                ours.append(target)
                if how == ["--rbind"]:
                    run(["mount", "--make-rslave", str(target)])
            yield
        finally:
            self.kill_leftovers()
            for target in reversed(ours):
                if run(["umount", "-R", str(target)], check=False, stderr=subprocess.DEVNULL).returncode:
                    run(["umount", "-R", "-l", str(target)], check=False)

    def kill_leftovers(self) -> None:
        """SIGKILL, by pid, processes still running inside this root (a server a test left)."""
        me = os.getpid()
        root = os.path.realpath(self.path)
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                if os.readlink(f"/proc/{entry}/root") == root:
                    os.kill(int(entry), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {
            "PATH": CHROOT_PATH,
            "HOME": "/root",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "TERM": "dumb",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "PIP_DEFAULT_TIMEOUT": "180",
            "PIP_ROOT_USER_ACTION": "ignore",
        }
        if (self.path / ROOT_CA.lstrip("/")).exists():
            for name in ("PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
                env[name] = ROOT_CA
        env.update(dict(self.suite.env))
        env.update(extra or {})
        return env

    def argv(self, script: str) -> List[str]:
        return ["chroot", str(self.path), "/bin/sh", "-c", script]

    def sh(self, script: str, quiet: bool = False, **kwargs) -> subprocess.CompletedProcess:
        if quiet:
            result = run(
                self.argv(script),
                check=False,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            if result.returncode != 0:
                raise RuntimeError(f"in {self.suite.name}: {script!r} failed:\n{result.stdout[-4000:]}")
            return result
        return run(self.argv(script), env=self.env(), **kwargs)


class Host:
    """The host itself, with the same interface as :class:`Root`."""

    path = Path("/")

    def host_path(self, inner: str) -> Path:
        return Path(inner)

    @contextlib.contextmanager
    def mounted(self, repo: bool = True) -> Iterator[None]:
        yield

    def env(self, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env["PATH"] = os.pathsep.join(
            p for p in env.get("PATH", CHROOT_PATH).split(os.pathsep) if not p.endswith("/.venv/bin")
        )
        env.update(extra or {})
        return env

    def argv(self, script: str) -> List[str]:
        return ["/bin/sh", "-c", script]


# ---------------------------------------------------------------------------------------
# interpreters and venvs


PROBE = r"""
import json, sys, sysconfig
gil = getattr(sys, "_is_gil_enabled", lambda: True)()
print(json.dumps({
    "version": " ".join(sys.version.split()),
    "short": "%d.%d.%d" % sys.version_info[:3],
    "ft_build": bool(sysconfig.get_config_var("Py_GIL_DISABLED")),
    "gil_enabled": bool(gil),
    "executable": sys.executable,
}))
"""


def _dev_requirements() -> List[str]:
    text = (REPO / "pyproject.toml").read_text()
    try:
        import tomllib  # Python 3.11+

        return list(tomllib.loads(text)["project"]["optional-dependencies"]["dev"])
    except ImportError:  # an older host python: the list is simple enough to read
        block = re.search(r"^dev\s*=\s*\[(.*?)^\]", text, re.S | re.M)
        return re.findall(r'"([^"]+)"', block.group(1)) if block else []


@dataclass
class Result:
    target: str
    suite: str
    version: str = ""
    free_threading: bool = False
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    not_installed: List[str] = field(default_factory=list)
    conflicts: List[str] = field(default_factory=list)  # pip check, after a one-by-one install
    warnings: List[str] = field(default_factory=list)  # pytest's warnings summary
    failures: List[Dict[str, str]] = field(default_factory=list)
    problem: str = ""
    log: str = ""
    stress: bool = False

    def line(self) -> str:
        ft = "yes" if self.free_threading else "no"
        version = self.version or f"{self.target} (did not run)"
        return (
            f"matrix: {version} free-threading {ft}: "
            f"{self.passed} passed, {self.failed + self.errors} failed, {self.skipped} skipped"
        )

    @property
    def ok(self) -> bool:
        return not self.problem and self.failed + self.errors == 0 and self.passed > 0


class Runner:
    def __init__(self, target: Target, args: argparse.Namespace) -> None:
        self.target = target
        self.args = args
        self.place = Host() if target.suite is None else Root(SUITES[target.suite])
        key = hashlib.sha1(str(REPO).encode()).hexdigest()[:8]
        if target.suite is None:
            self.venv = str(CACHE / "host" / f"venv-{target.name}-{key}")
        else:
            self.venv = f"{VENVS}/venv-{target.name}-{key}"
        self.logs = CACHE / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.log_path = self.logs / f"{target.name}.log"

    @property
    def python(self) -> str:
        if self.target.suite is None:
            return getattr(sys, "_base_executable", None) or sys.executable
        return self.target.python

    def sh(
        self,
        script: str,
        *,
        env: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
        capture: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run ``script`` in the target's place (cwd: the checkout), output appended to the log."""
        full = f"cd {shlex.quote(str(REPO))} && {script}"
        with open(self.log_path, "a") as logf:
            logf.write(f"\n$ {script}\n")
            logf.flush()
            out = {"stdout": logf, "stderr": subprocess.STDOUT} if capture else {}
            # its own process group, so that a timeout ends everything it started
            proc = subprocess.Popen(
                self.place.argv(full), env=self.place.env(env), start_new_session=True, **out
            )
            try:
                proc.wait(timeout)
            except BaseException:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise
            return subprocess.CompletedProcess(proc.args, proc.returncode)

    def out(self, script: str, env: Optional[Dict[str, str]] = None) -> str:
        full = f"cd {shlex.quote(str(REPO))} && {script}"
        result = subprocess.run(
            self.place.argv(full), env=self.place.env(env), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{script!r} failed:\n{result.stdout}\n{result.stderr}")
        return result.stdout

    # -- set-up ------------------------------------------------------------------------

    def prepare_root(self) -> None:
        if isinstance(self.place, Root):
            self.place.ensure(
                self.target.packages, refresh=self.args.refresh, sources=self.target.build_free_threaded
            )

    def build_interpreter(self) -> None:
        """CPython with --disable-gil from the upstream tarball of the target's Debian source
        package (``apt-get source``), installed under ``target.prefix`` in the root (cached)."""
        assert isinstance(self.place, Root)
        binary = self.place.host_path(self.target.python)
        if binary.exists() and not self.args.refresh:
            return
        source = self.target.source
        log(f"{self.target.name}: building CPython --disable-gil from Debian's {source} source (~5 min)")
        started = time.monotonic()
        script = f"""set -e
rm -rf /opt/klime-src && mkdir -p /opt/klime-src && cd /opt/klime-src
apt-get source --download-only -q {source}
tar xf "$(ls {source}_*.orig.tar.* | grep -v '[.]asc$' | head -n 1)"
cd Python-*/
./configure --prefix={self.target.prefix} --disable-gil --with-ensurepip=install \\
    --disable-test-modules >/dev/null
make -j{os.cpu_count() or 2} >/dev/null 2>make.err || (tail -50 make.err; exit 1)
make altinstall >/dev/null 2>&1
cd / && rm -rf /opt/klime-src
"""
        result = self.sh(script)
        if result.returncode != 0 or not binary.exists():
            raise RuntimeError(f"building the free-threaded CPython failed (see {self.log_path})")
        log(f"{self.target.name}: built in {time.monotonic() - started:.0f} s")

    def ensure_venv(self) -> Dict[str, object]:
        venv_py = f"{self.venv}/bin/python"
        marker = self.place.host_path(f"{self.venv}/.klime-matrix")
        want = hashlib.sha1((REPO / "pyproject.toml").read_bytes()).hexdigest()
        if (
            self.args.refresh
            or not marker.exists()
            or json.loads(marker.read_text()).get("pyproject") != want
        ):
            started = time.monotonic()
            log(f"{self.target.name}: venv {self.venv} and pip install -e '.[dev]'")
            q = shlex.quote
            if self.sh(f"rm -rf {q(self.venv)} && {q(self.python)} -m venv {q(self.venv)}").returncode:
                raise RuntimeError(f"creating the venv failed (see {self.log_path})")
            pip = f"{q(venv_py)} -m pip install -q"
            if self.sh(f"{pip} -U pip setuptools wheel").returncode:
                raise RuntimeError(f"upgrading pip failed (see {self.log_path})")
            not_installed: List[str] = []
            resolving = False
            try:  # an unsatisfiable set can keep pip's resolver backtracking for many minutes
                whole = self.sh(f"{pip} -e '.[dev]'", timeout=self.args.resolve_timeout).returncode == 0
            except subprocess.TimeoutExpired:
                whole, resolving = False, True
                if isinstance(self.place, Root):  # the root's /tmp is ours alone; the host's is not
                    self.sh("rm -rf /tmp/pip-*")  # a killed pip leaves its unpacked downloads (GBs)
                log(
                    f"{self.target.name}: pip still resolving '.[dev]' after "
                    f"{self.args.resolve_timeout:.0f} s (a conflict between requirements on this Python?)"
                )
            if not whole and not resolving:
                # the newest release of a dependency may have no wheel for this interpreter
                # and an sdist that does not build here: take the newest that has one
                log(f"{self.target.name}: '.[dev]' did not install; again with --prefer-binary")
                whole = self.sh(f"{pip} --prefer-binary -e '.[dev]'").returncode == 0
            if not whole:
                log(f"{self.target.name}: '.[dev]' does not install as a whole; one by one")
                if self.sh(f"{pip} -e .").returncode:
                    raise RuntimeError(f"pip install -e . failed (see {self.log_path})")
                for requirement in _dev_requirements():
                    if self.sh(f"{pip} --prefer-binary {q(requirement)}").returncode:
                        not_installed.append(requirement)
                        log(f"{self.target.name}: does not install here: {requirement}")
            check = subprocess.run(
                self.place.argv(f"{q(venv_py)} -m pip check"),
                env=self.place.env(),
                capture_output=True,
                text=True,
                check=False,
            )
            conflicts = [] if check.returncode == 0 else check.stdout.strip().splitlines()
            for line in conflicts:
                log(f"{self.target.name}: pip check: {line}")
            marker.write_text(
                json.dumps({"pyproject": want, "not_installed": not_installed, "conflicts": conflicts})
            )
            log(f"{self.target.name}: venv ready in {time.monotonic() - started:.0f} s")
        return dict(json.loads(marker.read_text()))

    # -- the run -----------------------------------------------------------------------

    def test_env(self, stress: bool) -> Dict[str, str]:
        env = {"KLIME_TEST_VENV": self.venv, "PYTHONUNBUFFERED": "1"}
        if self.target.free_threaded:
            env["PYTHON_GIL"] = "0"
        if stress:
            env.update(STRESS_ENV)
        return env

    def execute(self) -> Result:
        result = Result(self.target.name, self.target.suite or "host", log=str(self.log_path))
        self.log_path.write_text(f"# {self.target.name} ({self.target.note}) {time.ctime()}\n")
        started = time.monotonic()
        try:
            self.prepare_root()
            with self.place.mounted():
                if self.target.build_free_threaded:
                    self.build_interpreter()
                venv = self.ensure_venv()
                result.not_installed = list(venv.get("not_installed", []))  # type: ignore[arg-type]
                result.conflicts = list(venv.get("conflicts", []))  # type: ignore[arg-type]
                info = json.loads(
                    self.out(
                        f"{shlex.quote(self.venv)}/bin/python -c {shlex.quote(PROBE)}",
                        env=self.test_env(False),
                    )
                )
                result.version = info["version"]
                result.free_threading = bool(info["ft_build"]) and not info["gil_enabled"]
                stress = self.args.stress or (result.free_threading and not self.args.no_stress)
                result.stress = stress
                result.setup_seconds = time.monotonic() - started
                if self.args.setup_only:
                    return result
                if self.args.command:
                    return self._command(result)
                self._pytest(result, stress)
        except Exception as exc:  # one target's trouble does not stop the matrix
            lines = str(exc).strip().splitlines()
            result.problem = (lines[0] if lines else repr(exc)) + (
                f" (see {self.log_path})" if len(lines) > 1 else ""
            )
            with open(self.log_path, "a") as logf:
                logf.write(f"\nmatrix problem: {exc}\n")
        finally:
            result.seconds = time.monotonic() - started
        return result

    def _command(self, result: Result) -> Result:
        q = shlex.quote
        script = f"PATH={q(self.venv)}/bin:$PATH; export PATH; {self.args.command}"
        proc = self.sh(script, env=self.test_env(False), capture=False)
        if proc.returncode:
            result.problem = f"command exited {proc.returncode}"
        return result

    def _pytest(self, result: Result, stress: bool) -> None:
        q = shlex.quote
        junit = f"{self.venv}/junit.xml"
        self.sh(f"rm -f {q(junit)}")
        extra = " ".join(q(a) for a in self.args.pytest_args)
        log(
            f"{self.target.name}: python -m pytest -q {extra}"
            + (" (stress: " + " ".join(f"{k}={v}" for k, v in STRESS_ENV.items()) + ")" if stress else "")
        )
        try:
            # a test module that cannot import a dev dependency missing here is one error,
            # not the end of the run
            self.sh(
                f"{q(self.venv)}/bin/python -m pytest -q --continue-on-collection-errors "
                f"--junitxml={q(junit)} {extra}",
                env=self.test_env(stress),
                timeout=self.args.timeout,
            )
        except subprocess.TimeoutExpired:
            result.problem = f"the suite did not finish within {self.args.timeout:.0f} s"
        result.warnings = self._read_warnings()
        junit_host = self.place.host_path(junit)
        if junit_host.exists():
            self._read_junit(junit_host, result)
        else:
            self._read_summary(result)
            if not result.problem and not (result.passed or result.failed):
                result.problem = f"pytest produced no results (see {self.log_path})"

    def _read_junit(self, path: Path, result: Result) -> None:
        tree = ET.parse(path)
        for case in tree.iter("testcase"):
            outcome = None
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = child
                    break
            if outcome is None:
                result.passed += 1
                continue
            if outcome.tag == "skipped":
                result.skipped += 1
                continue
            if outcome.tag == "failure":
                result.failed += 1
            else:
                result.errors += 1
            classname = case.get("classname", "")
            name = case.get("name", "")
            if classname:
                node = classname.replace(".", "/") + ".py::" + name
            else:  # a module that failed to collect
                node = name.replace(".", "/") + ".py"
            message = (outcome.get("message") or (outcome.text or "")).strip().splitlines()
            result.failures.append(
                {
                    "test": node,
                    "kind": outcome.tag,
                    "message": (message[0] if message else "")[:300],
                }
            )

    def _read_warnings(self) -> List[str]:
        """The distinct warnings of pytest's warnings summary (``file:line: Category: text``)."""
        text = self.log_path.read_text(errors="replace")
        start = text.rfind("warnings summary")
        if start < 0:
            return []
        end = text.find("-- Docs:", start)
        block = text[start : end if end > 0 else None].splitlines()
        found: List[str] = []
        for i, line in enumerate(block):
            m = re.search(r"(\w+Warning): (.*)", line)
            if m:
                where = ""
                for back in range(i, 0, -1):  # the "file:line: " on this or an earlier line
                    w = re.match(r"\s*(\S+\.py:\d+)", block[back])
                    if w:
                        where = w.group(1) + ": "
                        break
                item = f"{where}{m.group(1)}: {m.group(2).strip()[:200]}"
                if item not in found:
                    found.append(item)
        return found

    def _read_summary(self, result: Result) -> None:
        text = self.log_path.read_text(errors="replace")
        for line in reversed(text.splitlines()):
            if re.search(r"\d+ (passed|failed)", line):
                for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?)", line):
                    if word == "passed":
                        result.passed = int(n)
                    elif word == "failed":
                        result.failed = int(n)
                    elif word == "skipped":
                        result.skipped = int(n)
                    else:
                        result.errors = int(n)
                return


# ---------------------------------------------------------------------------------------
# reports


def markdown(results: Sequence[Result]) -> str:
    out = [
        "| target | suite | interpreter | free-threading | passed | failed | skipped | minutes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r.target} | {r.suite} | {r.version or '-'} | {'yes' if r.free_threading else 'no'} | "
            f"{r.passed} | {r.failed + r.errors} | {r.skipped} | {r.seconds / 60:.1f} |"
        )
    for r in results:
        if r.problem or r.failures or r.not_installed or r.conflicts or r.warnings:
            out.append(f"\n### {r.target}\n")
            if r.problem:
                out.append(f"- problem: {r.problem}")
            if r.not_installed:
                out.append(f"- did not install: {', '.join(r.not_installed)}")
            for line in r.conflicts:
                out.append(f"- pip check: {line}")
            for f in r.failures:
                out.append(f"- `{f['test']}` ({f['kind']}): {f['message']}")
            for w in r.warnings:
                out.append(f"- warning: {w}")
    return "\n".join(out) + "\n"


def list_targets() -> None:
    for name, t in TARGETS.items():
        if t.suite is None:
            where, cached = "host", "-"
        else:
            root = Root(SUITES[t.suite])
            where, cached = t.suite, ("cached" if root.installed() else "not cached")
        default = "default" if name in DEFAULT_TARGETS else ""
        print(f"{name:6} {where:9} {t.python or sys.executable:40} {cached:11} {default:8} {t.note}")
    print(f"cache: {CACHE}")


def survey(suites: Sequence[str]) -> None:
    """What each suite's apt-cache offers (creates a bare root for a suite not cached yet)."""
    script = (
        "for v in 3.8 3.9 3.10 3.11 3.12 3.13 3.14 3.15 3.16; do "
        "apt-cache madison python$v 2>/dev/null; done; "
        "echo '-- free-threaded/nogil packages:'; "
        "apt-cache search --names-only 'nogil|python3\\.[0-9]+t$|freethread' ; "
        "apt-cache search 'free-threaded|free threaded|nogil'"
    )
    for name in suites:
        root = Root(SUITES[name])
        root.ensure(())
        print(f"== {name}")
        with root.mounted(repo=False):
            root.sh("apt-get update -q >/dev/null 2>&1; " + script)


# ---------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help=f"targets, comma-separated or repeated (default: {','.join(DEFAULT_TARGETS)})",
    )
    parser.add_argument("--fail-fast", action="store_true", help="stop after the first target that fails")
    parser.add_argument(
        "--refresh", action="store_true", help="apt-get update/dist-upgrade the roots and rebuild the venvs"
    )
    parser.add_argument("--stress", action="store_true", help="scale the concurrency tests up everywhere")
    parser.add_argument(
        "--no-stress", action="store_true", help="do not scale them up on free-threaded builds"
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as a markdown table")
    parser.add_argument("--timeout", type=float, default=5400, help="seconds per suite run (default 5400)")
    parser.add_argument(
        "--resolve-timeout",
        type=float,
        default=180,
        help="seconds pip may take on '.[dev]' before it is installed one by one",
    )
    parser.add_argument("--command", help="run this shell command in each target's venv instead of pytest")
    parser.add_argument(
        "--setup-only", action="store_true", help="create the roots, interpreters and venvs, run nothing"
    )
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument(
        "--survey",
        nargs="*",
        metavar="SUITE",
        help="print what apt-cache offers in these suites (default: all) and exit",
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args(argv)

    if args.list:
        list_targets()
        return 0
    if os.geteuid() != 0:
        print("test_matrix: needs root (debootstrap, mount, chroot)", file=sys.stderr)
        return 2
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"test_matrix: another run holds {CACHE}/.lock", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unmount on the way out

    if args.survey is not None:
        survey(args.survey or list(SUITES))
        return 0

    names = [n for spec in args.only for n in spec.split(",") if n] or DEFAULT_TARGETS
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")

    results: List[Result] = []
    started = time.monotonic()
    for name in names:
        result = Runner(TARGETS[name], args).execute()
        results.append(result)
        if args.setup_only:
            print(f"matrix: {name}: {result.problem or 'ready: ' + result.version}", flush=True)
        elif not args.command:
            print(result.line(), flush=True)
            if result.not_installed:
                print(f"matrix: {name}: not installed there: {', '.join(result.not_installed)}", flush=True)
            for line in result.conflicts:
                print(f"matrix: {name}: pip check: {line}", flush=True)
            if result.problem:
                print(f"matrix: {name}: {result.problem}", flush=True)
            for f in result.failures[:MAX_LISTED]:
                print(f"matrix: {name}:   {f['kind']} {f['test']}: {f['message'][:160]}", flush=True)
            if len(result.failures) > MAX_LISTED:
                print(
                    f"matrix: {name}:   ... and {len(result.failures) - MAX_LISTED} more (--json/--markdown "
                    "list them all)",
                    flush=True,
                )
            for w in result.warnings:
                print(f"matrix: {name}:   warning {w[:200]}", flush=True)
        log(f"{name}: {result.seconds / 60:.1f} min (set-up {result.setup_seconds:.0f} s); log {result.log}")
        if args.fail_fast and not result.ok:
            break
    log(f"whole matrix: {(time.monotonic() - started) / 60:.1f} min")

    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(markdown(results))
    if args.command:
        return 0 if all(not r.problem for r in results) else 1
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
