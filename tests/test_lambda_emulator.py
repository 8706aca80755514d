"""Tests of the local Lambda Runtime API emulator (tests/support/lambda_emulator.py)
against the real awslambdaric runtime client."""

import importlib.util
import os
import signal
import sys
import time

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support.lambda_emulator import (  # noqa: E402
    LambdaEmulator,
    LambdaInitError,
    RuntimeExitedError,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("awslambdaric") is None, reason="awslambdaric is not installed"
)

HANDLERS_DIR = os.path.join(_TESTS_DIR, "support")
MOD = "lambda_handlers_fixture"


def emulator(function, **kwargs):
    kwargs.setdefault("cwd", HANDLERS_DIR)
    return LambdaEmulator("%s.%s" % (MOD, function), **kwargs)


def process_gone(pid):
    """True when pid is neither running nor an unreaped child of ours."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child (anymore): already reaped
    else:
        return False  # still our child: running or a zombie not yet reaped
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def proc_state(pid):
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    i = data.rindex(b")")
    return data[i + 2 : i + 3].decode()


def file_size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_echo_round_trip():
    with emulator("echo") as emu:
        inv = emu.invoke({"hello": "world", "n": [1, 2]}, deadline_ms=10_000)
        assert inv.ok, emu.log_tail()
        assert inv.error_type is None
        assert inv.payload["echo"] == {"hello": "world", "n": [1, 2]}
        assert inv.payload["request_id"] == inv.request_id
        assert inv.payload["pid"] == emu.pid
        assert 9_000 <= inv.payload["remaining_ms"] <= 10_000
        assert inv.invoked_at <= inv.responded_at
        assert inv.duration == pytest.approx(inv.responded_at - inv.invoked_at)
        assert emu.invocations == [inv]

        # default deadline: timeout_s from when the runtime gets the event
        inv = emu.invoke(None)
        assert inv.ok
        assert inv.payload["echo"] is None
        assert 29_000 <= inv.payload["remaining_ms"] <= 30_000


def test_context_and_environment():
    with emulator(
        "context_info", function_name="fn-under-test", memory_mb=256, env={"KLIME_TEST_EXTRA": "x"}
    ) as emu:
        inv = emu.invoke({})
        assert inv.ok, emu.log_tail()
        p = inv.payload
        assert p["function_name"] == "fn-under-test"
        assert p["function_version"] == "$LATEST"
        assert p["memory_limit_in_mb"] == "256"
        assert p["log_group_name"] == "/aws/lambda/fn-under-test"
        assert p["log_stream_name"]
        assert p["invoked_function_arn"] == emu.function_arn
        assert p["invoked_function_arn"].endswith(":function:fn-under-test")
        assert p["aws_request_id"] == inv.request_id
        env = p["env"]
        assert env["_HANDLER"] == MOD + ".context_info"
        assert env["LAMBDA_TASK_ROOT"] == HANDLERS_DIR
        assert env["AWS_LAMBDA_RUNTIME_API"] == "127.0.0.1:%d" % emu.port
        assert env["AWS_EXECUTION_ENV"].startswith("AWS_Lambda_python3.")
        assert env["AWS_REGION"]
        assert env["_X_AMZN_TRACE_ID"].startswith("Root=1-")
        assert env["KLIME_TEST_EXTRA"] == "x"
        # the runtime leads its own process group (what freeze/stop signal)
        assert p["pgid"] == p["pid"] == emu.pid


def test_error_handler():
    with emulator("boom") as emu:
        inv = emu.invoke({"k": 1})
        assert inv.ok is False
        # awslambdaric's C client posts /error without the error-type header;
        # the emulator then takes errorType from the body.
        assert inv.error_type == "ValueError"
        assert inv.payload["errorType"] == "ValueError"
        assert "boom" in inv.payload["errorMessage"]
        assert inv.payload["requestId"] == inv.request_id
        # the sandbox survives a handler error
        again = emu.invoke({"k": 2})
        assert again.ok is False and again.request_id != inv.request_id


def test_warm_invocations_reuse_process():
    with emulator("echo") as emu:
        results = [emu.invoke({"i": i}, timeout=10) for i in range(5)]
        assert all(r.ok for r in results), emu.log_tail()
        assert [r.payload["echo"]["i"] for r in results] == list(range(5))
        assert {r.payload["pid"] for r in results} == {emu.pid}
        assert len({r.request_id for r in results}) == 5
        # serialized: each invocation is handed out after the previous answer
        for prev, cur in zip(results, results[1:]):
            assert prev.responded_at <= cur.invoked_at


def test_freeze_stops_background_threads(tmp_path):
    marker = str(tmp_path / "marker.txt")
    with emulator("marker", env={"KLIME_TEST_MARKER_FILE": marker}) as emu:
        assert not emu.frozen  # cold start done, no invocation yet: not frozen
        assert wait_until(lambda: file_size(marker) > 0, 5.0), emu.log_tail()

        for _ in range(2):
            inv = emu.invoke({"wait_s": 2.0}, timeout=10)
            assert inv.ok, emu.log_tail()
            # the thread ran during the invocation
            assert inv.payload["size_at_end"] > inv.payload["size_at_start"]

            assert emu.wait_frozen(5.0), emu.log_tail()
            assert emu.frozen
            if proc_state(emu.pid) is not None:
                assert proc_state(emu.pid) == "T"

            # Negative check: while frozen the file must not grow (0.3 s with
            # a 20 ms writer is ~15 missed lines).
            size = file_size(marker)
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                assert file_size(marker) == size, "marker file grew while frozen"
                time.sleep(0.02)
            assert file_size(marker) == size


def test_no_freeze_control(tmp_path):
    """Positive control for the freeze test: without freeze the file keeps growing."""
    marker = str(tmp_path / "marker.txt")
    with emulator("marker", env={"KLIME_TEST_MARKER_FILE": marker}, freeze=False) as emu:
        assert emu.invoke({"wait_s": 2.0}, timeout=10).ok
        assert not emu.wait_frozen(0.1)
        size = file_size(marker)
        assert wait_until(lambda: file_size(marker) > size, 2.0)


def test_stop_when_frozen_leaves_no_process(tmp_path):
    emu = emulator("echo").start()
    try:
        pid = emu.pid
        assert emu.invoke({"x": 1}).ok
        assert emu.wait_frozen(5.0)
    finally:
        emu.stop()
    assert process_gone(pid)
    assert not emu.frozen
    emu.stop()  # idempotent
    assert emu.returncode is not None
    with pytest.raises(RuntimeError):
        emu.invoke({"x": 2}, timeout=1)


def test_context_manager_cleans_up_on_failure():
    with pytest.raises(KeyError):
        with emulator("echo") as emu:
            pid = emu.pid
            assert emu.invoke({}).ok
            assert emu.wait_frozen(5.0)
            raise KeyError("test failure inside the block")
    assert process_gone(pid)


def test_init_error_fails_start_fast():
    emu = LambdaEmulator("klime_no_such_module_xyz.handler", cwd=HANDLERS_DIR)
    t0 = time.monotonic()
    with pytest.raises(LambdaInitError) as excinfo:
        emu.start(ready_timeout=20)
    assert time.monotonic() - t0 < 10
    msg = str(excinfo.value)
    assert "klime_no_such_module_xyz" in msg
    assert "Runtime.ImportModuleError" in msg
    assert "--- runtime log ---" in msg
    assert emu.init_error[0] == "Runtime.ImportModuleError"
    assert emu.pid is not None and process_gone(emu.pid)
    emu.stop()


def test_invoke_timeout_then_recovers():
    with emulator("sleepy") as emu:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as excinfo:
            emu.invoke({"s": 1.0}, timeout=0.3)
        assert time.monotonic() - t0 < 1.0
        assert "--- runtime log ---" in str(excinfo.value)
        # the late answer to the abandoned invocation is absorbed; the next works
        inv = emu.invoke({"s": 0}, timeout=10)
        assert inv.ok and inv.payload["slept"] == 0


def test_runtime_crash_fails_invoke_fast():
    with emulator("die") as emu:
        t0 = time.monotonic()
        with pytest.raises(RuntimeExitedError):
            emu.invoke({"code": 7}, timeout=20)
        assert time.monotonic() - t0 < 5
        assert emu.returncode == 7


def test_stop_terminates_frozen_runtime_with_sigterm():
    with emulator("echo") as emu:
        assert emu.invoke({}).ok
        assert emu.wait_frozen(5.0)
    # awslambdaric has no SIGTERM handler: it dies of SIGTERM, not of the
    # SIGKILL fallback
    assert emu.returncode == -signal.SIGTERM


def test_stop_continues_frozen_runtime_before_sigterm(tmp_path):
    """A SIGTERM handler in a frozen runtime runs (SIGCONT comes first)."""
    term_file = str(tmp_path / "term.txt")
    env = {"KLIME_TEST_SIGTERM_FILE": term_file, "AWS_EXECUTION_ENV": "AWS_Lambda_python3.12"}
    emu = emulator("echo", env=env, term_timeout=5.0).start()
    try:
        assert emu.invoke({}).ok, emu.log_tail()
        assert emu.wait_frozen(5.0)
        t0 = time.monotonic()
    finally:
        emu.stop()
    assert time.monotonic() - t0 < 4.0, "SIGTERM handler did not run: fell back to SIGKILL"
    assert emu.returncode == 0, emu.log_tail()
    with open(term_file) as f:
        assert f.read() == "sigterm %d\n" % emu.pid
