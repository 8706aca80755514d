"""examples/typed_usage.py exercises klime's documented API: it must pass ``mypy --strict``
and, run as a program against its own local collector on 127.0.0.1, every check in it must
hold."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import pytest

pytest.importorskip("mypy")

ROOT = Path(__file__).resolve().parent.parent
TYPED = ROOT / "examples" / "typed_usage.py"


def mypy(paths: List[str], cache: Path, env: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The project's [tool.mypy] settings apply (strict, mypy_path = src); --strict is repeated
    # so the check stays strict whatever the configuration says.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "--no-error-summary", *paths],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_typed_usage_passes_mypy_strict(tmp_path, src_env):
    result = mypy([str(TYPED)], tmp_path / "cache", src_env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_sees_klime_types(tmp_path, src_env):
    """A control: misuse of the API is reported, so klime is not silently typed Any."""
    wrong = tmp_path / "wrong_usage.py"
    wrong.write_text(
        textwrap.dedent(
            """
            import klime

            client = klime.Client("key")
            sent: str = client.flush().sent
            client.track("Signup", user_id=["u1"])
            client.identify_sync("u1", timeout="5")
            """
        )
    )
    result = mypy([str(wrong)], tmp_path / "cache", src_env)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(
        ':5: error: Incompatible types in assignment (expression has type "int"' in line for line in lines
    )
    assert any(
        ':6: error: Argument "user_id" to "track" of "Client" has incompatible type' in line for line in lines
    )
    assert any(':7: error: Argument "timeout" to "identify_sync"' in line for line in lines), result.stdout


def test_typed_usage_runs_against_the_local_collector(src_env):
    result = subprocess.run(
        [sys.executable, str(TYPED)], cwd=ROOT, env=src_env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("typed_usage: ok, ")
