"""klime._logging: a warning that means lost events reaches a person.

Without any logging set up, Python's last-resort handler would print WARNING records to
stderr, but the NullHandler that libraries add switches it off; klime writes the one line
per loss episode itself. An app that set up logging gets the records instead, and no
duplicate line on stderr. Each case runs in a fresh interpreter (pytest configures logging
in this one)."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest

from conftest import WRITE_KEY
from klime._logging import NULL_HANDLER, logging_configured
from klime.devserver import Fault


def run(script: str, src_env: dict, *, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=src_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def klime_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("klime: ")]


OVERFLOW = """
import klime
client = klime.Client({key!r}, endpoint={url!r}, max_queue_size=50, max_batch_size=10,
                      flush_interval=60_000)
{setup}
for i in range(2000):        # the first batch hangs in the black hole: the queue overflows
    client.track("Flood", {{"i": i}}, user_id="u")
stats = client.stats()
assert stats["dropped"] > 1000, stats
client.shutdown(timeout=0.5)
print("done", client.stats()["dropped"])
"""


def test_a_full_queue_says_so_once_on_stderr_without_logging(collector, src_env):
    collector.set_mode(Fault.blackhole())
    proc = run(OVERFLOW.format(key=WRITE_KEY, url=collector.url, setup=""), src_env)
    lines = klime_lines(proc.stderr)
    overflow = [line for line in lines if "queue is full" in line]
    assert len(overflow) == 1, proc.stderr  # once per episode, not once per dropped event
    assert "max_queue_size=50" in overflow[0]
    assert len(lines) <= 3, proc.stderr  # + the shutdown's own loss line, at most
    assert WRITE_KEY not in proc.stderr


def test_an_app_that_configured_logging_gets_records_and_no_stderr_line(collector, src_env, tmp_path):
    collector.set_mode(Fault.blackhole())
    log_file = tmp_path / "app.log"
    setup = f"import logging; logging.basicConfig(filename={str(log_file)!r}, level=logging.INFO)"
    proc = run(OVERFLOW.format(key=WRITE_KEY, url=collector.url, setup=setup), src_env)
    assert klime_lines(proc.stderr) == [], proc.stderr
    records = log_file.read_text()
    assert "WARNING:klime:klime: the queue is full" in records
    assert records.count("the queue is full") >= 1  # one per episode (a busy machine may see two)


def test_a_server_that_keeps_failing_says_so_once(collector, src_env):
    collector.set_mode(Fault.status_code(503))
    script = f"""
        import klime
        client = klime.Client({WRITE_KEY!r}, endpoint={collector.url!r}, retry_max_attempts=2,
                              retry_initial_delay=10, max_batch_size=5)
        for i in range(50):               # ten batches, each given up on
            client.track("Failing", {{"i": i}}, user_id="u")
        result = client.flush(timeout=20)
        assert result.failed == 50, result
    """
    proc = run(script, src_env)
    lines = klime_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    assert "events are not being delivered" in lines[0] and "HTTP 503" in lines[0]


def test_a_rejected_write_key_says_so_once(collector, src_env):
    script = f"""
        import klime
        client = klime.Client("not-the-key", endpoint={collector.url!r}, max_batch_size=5)
        for i in range(30):
            client.track("Rejected", {{"i": i}}, user_id="u")
        assert client.flush(timeout=20).failed == 30
    """
    proc = run(script, src_env)
    lines = klime_lines(proc.stderr)
    assert len(lines) == 1 and "401" in lines[0] and "write key" in lines[0], proc.stderr
    assert "not-the-key" not in proc.stderr


def test_a_new_episode_after_a_recovery_is_said_again_but_not_within_a_minute(collector, src_env):
    script = f"""
        import klime
        from klime.devserver import Fault
        client = klime.Client({WRITE_KEY!r}, endpoint={collector.url!r}, retry_max_attempts=1,
                              max_batch_size=5)
        def burst(tag):
            for i in range(10):
                client.track(tag, {{"i": i}}, user_id="u")
            return client.flush(timeout=20)
        print("first", burst("a").failed)
        print("ok", burst("b").sent)
        print("second", burst("c").failed)
    """
    collector.respond(
        *([Fault.status_code(503)] * 2),
        Fault.status_code(200),
        Fault.status_code(200),
        *([Fault.status_code(503)] * 2),
    )
    proc = run(script, src_env)
    assert "first 10" in proc.stdout and "ok 10" in proc.stdout and "second 10" in proc.stdout, proc.stdout
    # two episodes, but the second within a minute of the first: one line on stderr
    assert len(klime_lines(proc.stderr)) == 1, proc.stderr


def test_a_capped_batch_size_is_said_on_stderr(src_env):
    proc = run(
        """
        import klime
        klime.Client("k", endpoint="http://127.0.0.1:9", max_batch_size=500).shutdown(0)
        """,
        src_env,
    )
    (line,) = klime_lines(proc.stderr)
    assert "max_batch_size=500" in line and "using 100" in line


def test_nothing_on_stderr_when_nothing_is_lost(collector, src_env):
    proc = run(
        f"""
        import klime
        client = klime.Client({WRITE_KEY!r}, endpoint={collector.url!r})
        for i in range(100):
            client.track("Fine", {{"i": i}}, user_id="u")
        """,
        src_env,
    )
    assert proc.stderr == ""
    assert len(collector.events()) == 100


# ---------------------------------------------------------------------------------------
# logging_configured, in this process


@pytest.fixture
def bare_logging(monkeypatch):
    """Returns a function that makes logging look as in an app that configured nothing
    (pytest's own handlers, added around each test phase, removed) and gives the ``klime``
    logger; monkeypatch undoes it all."""
    klime_logger = logging.getLogger("klime")

    def bare() -> logging.Logger:
        monkeypatch.setattr(logging.getLogger(), "handlers", [])
        monkeypatch.setattr(klime_logger, "handlers", [NULL_HANDLER])
        monkeypatch.setattr(klime_logger, "propagate", True)
        monkeypatch.setattr(klime_logger, "level", logging.NOTSET)
        klime_logger.manager._clear_cache()  # type: ignore[attr-defined]
        return klime_logger

    yield bare
    klime_logger.manager._clear_cache()  # type: ignore[attr-defined]


def test_klime_null_handler_alone_is_not_configuration(bare_logging):
    assert logging_configured(bare_logging()) is False


def test_a_root_handler_is_configuration(bare_logging, monkeypatch):
    logger = bare_logging()
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler()])
    assert logging_configured(logger) is True


def test_an_apps_own_handler_on_klime_is_configuration(bare_logging, monkeypatch):
    logger = bare_logging()
    monkeypatch.setattr(logger, "handlers", [NULL_HANDLER, logging.NullHandler()])
    assert logging_configured(logger) is True  # silenced on purpose


def test_a_logger_that_does_not_propagate_and_has_no_handler_is_not_configuration(bare_logging, monkeypatch):
    logger = bare_logging()
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.StreamHandler()])
    monkeypatch.setattr(logger, "propagate", False)
    assert logging_configured(logger) is False


def test_warnings_switched_off_for_klime_are_respected(bare_logging, monkeypatch):
    logger = bare_logging()
    monkeypatch.setattr(logger, "level", logging.ERROR)
    logger.manager._clear_cache()  # type: ignore[attr-defined]
    assert logging_configured(logger) is True


def test_a_custom_logger_object_is_configuration():
    assert logging_configured(object()) is True
