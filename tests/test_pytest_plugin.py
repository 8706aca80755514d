"""Tests for klime's pytest plugin (the ``klime_events`` fixture), run in inner pytest
sessions through pytester.

The plugin is loaded the way users get it: through its ``pytest11`` entry point when klime
is installed with it, else with ``-p klime.testing.pytest_plugin``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from importlib import metadata

import pytest

# Inner in-process sessions drop the modules they imported first when they end; import the
# ones they use here, so that every session shares one copy (two copies of requests break it).
import klime.senders.http
import klime.testing.pytest_plugin  # noqa: F401
from conftest import WRITE_KEY

pytest_plugins = ["pytester"]

PLUGIN = "klime.testing.pytest_plugin"


def _entry_point_installed() -> bool:
    eps = metadata.entry_points()
    group = eps.select(group="pytest11") if hasattr(eps, "select") else eps.get("pytest11", [])
    return any(ep.value == PLUGIN for ep in group)


ENTRY_POINT = _entry_point_installed()
LOAD = () if ENTRY_POINT else ("-p", PLUGIN)


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*LOAD, "-p", "no:cacheprovider", *args)


def test_fixture_captures_and_asserts(pytester):
    pytester.makepyfile(
        """
        import klime

        def test_signup(klime_events):
            klime.identify("u1", {"email": "ada@example.com"})
            client = klime.Client("any-key", endpoint="http://127.0.0.1:9")  # never contacted
            client.track("Signup", {"plan": "pro"}, user_id="u1")
            client.group_sync("org_1", user_id="u1")
            klime_events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"})
            klime_events.assert_identified("u1")
            klime_events.assert_grouped("org_1", user_id="u1")
            assert len(klime_events.events) == 3

        def test_next_test_starts_empty(klime_events):
            assert klime_events.events == []
            assert klime.client is klime_events.client
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2)


def test_failed_assertion_reads_well(pytester):
    pytester.makepyfile(
        """
        import klime

        def test_wrong_user(klime_events):
            klime.track("Signup", {"plan": "pro"}, user_id="u2")
            klime_events.assert_tracked("Signup", user_id="u1")
        """
    )
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: expected a track \"Signup\" user_id='u1' event",
            "*1 events were captured:",
            '*track "Signup" user_id=\'u2\' properties={"plan": "pro"}',
        ]
    )
    # The helper's own frames are hidden: the failure points at the test line.
    assert "_assert(" not in result.stdout.str()


def test_suites_not_using_the_fixture_are_untouched(pytester, collector):
    """With the plugin loaded, a test that does not ask for klime_events sends for real."""
    pytester.makepyfile(
        f"""
        import klime
        from klime.transports import _choice as transports

        def test_real_sending():
            assert transports._override is None
            client = klime.Client({WRITE_KEY!r}, endpoint={collector.url!r})
            assert client.track_sync("Real", user_id="u1").accepted == 1
            client.track("Queued", user_id="u1")
            assert client.flush(timeout=10).ok
            client.shutdown()

        def test_after_a_capture(klime_events):
            klime.track("Captured", user_id="u1")

        def test_real_again():
            test_real_sending()
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=3)
    assert [e["event"] for e in collector.events()] == ["Real", "Queued", "Real", "Queued"]


def test_fixture_listed_and_documented(pytester):
    result = run(pytester, "--fixtures")
    result.stdout.fnmatch_lines(["klime_events*", "*Capture every klime event of the test*"])


def _fake_entry_point(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Until klime's own metadata declares it: the same ``pytest11`` entry point (name
    ``klime``), from a minimal distribution put on the subprocess's path."""
    dist = pytester.path / "site" / "klime_entry_point_check-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: klime-entry-point-check\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[pytest11]\nklime = {PLUGIN}\n")
    monkeypatch.setenv("PYTHONPATH", str(dist.parent), prepend=os.pathsep)


def test_entry_point_autoloads_and_can_be_disabled(pytester, monkeypatch):
    """In a fresh process the fixture is there with no -p and no conftest; -p no:klime
    removes it."""
    if not ENTRY_POINT:
        _fake_entry_point(pytester, monkeypatch)
    pytester.makepyfile(
        """
        import klime

        def test_it(klime_events):
            klime.track("Signup", user_id="u1")
            klime_events.assert_tracked("Signup")
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:klime")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'klime_events' not found*"])


def test_plugin_import_is_light(src_env):
    """Loading the plugin changes nothing and pulls in no HTTP stack."""
    code = textwrap.dedent(
        """
        import sys, time
        t = time.perf_counter()
        import klime.testing.pytest_plugin
        elapsed = time.perf_counter() - t
        import klime
        from klime.transports import _choice as transports
        assert transports._override is None
        assert klime.client is None
        heavy = [m for m in ("requests", "urllib3", "klime.senders.http") if m in sys.modules]
        assert not heavy, heavy
        print(f"{elapsed * 1000:.0f}")
        """
    )
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], env=src_env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    print(f"plugin import: {out.stdout.strip()} ms (process {time.perf_counter() - started:.2f} s)")
