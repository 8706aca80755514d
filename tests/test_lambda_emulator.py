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


# ---------------------------------------------------------------------------------------
# The Extensions API


def extension_log(path):
    """[(eventType, requestId, monotonic time)] the test extension wrote."""
    try:
        with open(path) as f:
            rows = [line.split() for line in f if line.strip()]
    except OSError:
        return []
    return [(kind, rid, float(at)) for kind, rid, at in rows]


def test_internal_extension_registers_during_init_and_gets_every_invoke(tmp_path):
    log = str(tmp_path / "ext.log")
    env = {"KLIME_TEST_EXTENSION": "probe", "KLIME_TEST_EXTENSION_LOG": log}
    with emulator("extension_info", env=env) as emu:
        assert emu.init_done_at is not None  # start() returned after Init: runtime + extension called next
        (record,) = emu.extensions
        assert (record.name, record.events, record.external) == ("probe", ("INVOKE",), False)
        assert record.state == "waiting" and record.next_calls == 1

        invs = []
        for i in range(3):
            inv = emu.invoke({"i": i}, deadline_ms=10_000)
            assert inv.ok, emu.log_tail()
            assert emu.wait_ended(inv)
            invs.append(inv)
        answer = invs[0].payload["extension"]
        assert answer["status"] == 200 and answer["identifier"] == record.identifier
        assert answer["body"]["functionName"] == "klime-test"
        assert answer["body"]["handler"] == MOD + ".extension_info"
        # one INVOKE per invocation, with the runtime's request id and deadline (epoch ms)
        assert [e["requestId"] for e in record.received] == [inv.request_id for inv in invs]
        for event, inv in zip(record.received, invs):
            assert event["eventType"] == "INVOKE"
            assert (
                abs(event["deadlineMs"] / 1000.0 - time.time() - (inv.deadline_at - time.monotonic())) < 0.5
            )
            assert event["invokedFunctionArn"] == emu.function_arn
        assert [rid for _, rid, _ in extension_log(log)] == [inv.request_id for inv in invs]


def test_response_goes_out_at_once_and_the_freeze_waits_for_the_extension(tmp_path):
    """The runtime answers at once; the extension works 0.4 s more after the response; the
    invocation ends (and the sandbox freezes) only once the extension called next."""
    log = str(tmp_path / "ext.log")
    env = {
        "KLIME_TEST_EXTENSION": "slowpoke",
        "KLIME_TEST_EXTENSION_LOG": log,
        "KLIME_TEST_EXTENSION_DELAY": "0.4",
    }
    with emulator("echo", env=env) as emu:
        for i in range(2):
            inv = emu.invoke({"i": i})
            assert inv.ok, emu.log_tail()
            assert inv.duration < 0.3, "the invoker does not wait for the extension"
            assert inv.ended_at is None and not emu.frozen  # the extension is still at work
            assert emu.wait_frozen(5.0)
            assert inv.ended_at is not None and inv.ended_at - inv.invoked_at >= 0.4
            assert inv.post_runtime >= 0.3  # the extension's 0.4 s started with the INVOKE event
            assert emu.frozen_at >= inv.ended_at
            (done,) = [at for _, rid, at in extension_log(log) if rid == inv.request_id]
            assert inv.responded_at < done <= inv.ended_at
        # the second invocation was handed out only after the first one ended
        first, second = emu.invocations
        assert second.invoked_at >= first.ended_at


def test_a_queued_invoke_waits_for_the_extension_then_runs_without_a_freeze(tmp_path):
    env = {"KLIME_TEST_EXTENSION": "slowpoke", "KLIME_TEST_EXTENSION_DELAY": "0.3"}
    with emulator("echo", env=env) as emu:
        first = emu.invoke({"i": 1})
        second = emu.invoke({"i": 2})  # queued while the extension works on the first
        assert first.ok and second.ok
        assert second.invoked_at >= first.ended_at
        assert emu.wait_frozen(5.0)
        assert emu.freezes == 1  # no freeze between the two: an event was waiting


def test_registration_after_init_is_refused(tmp_path):
    with emulator("register_late") as emu:
        inv = emu.invoke({"name": "late"})
        assert inv.ok, emu.log_tail()
        assert inv.payload["status"] == 403
        assert "only during Init" in inv.payload["body"]["errorMessage"]
        assert emu.extensions == []
        assert emu.refused_registrations[0][:2] == ("late", 403)
        # nothing waits for a refused extension: the sandbox freezes as usual
        assert emu.wait_ended(inv) and emu.wait_frozen()


def test_internal_extensions_cannot_register_for_shutdown():
    env = {"KLIME_TEST_EXTENSION": "greedy", "KLIME_TEST_EXTENSION_EVENTS": "INVOKE,SHUTDOWN"}
    with emulator("extension_info", env=env) as emu:
        inv = emu.invoke({})
        assert inv.payload["extension"]["status"] == 400
        assert "SHUTDOWN" in inv.payload["extension"]["body"]["errorMessage"]
        assert emu.extensions == []


def test_extension_init_error_fails_init():
    env = {"KLIME_TEST_EXTENSION": "broken", "KLIME_TEST_EXTENSION_FAIL": "init"}
    emu = emulator("echo", env=env)
    with pytest.raises(LambdaInitError, match="broken"):
        emu.start(ready_timeout=20)
    (record,) = emu.extensions
    assert record.state == "failed" and record.error[:2] == ("init", "Extension.Test")
    emu.stop()


def test_extension_exit_error_resets_the_sandbox_after_the_invocation():
    env = {"KLIME_TEST_EXTENSION": "quitter", "KLIME_TEST_EXTENSION_FAIL": "exit"}
    with emulator("echo", env=env) as emu:
        inv = emu.invoke({"i": 1})
        assert inv.ok
        assert emu.wait_ended(inv), "the failed extension is no longer waited for"
        (record,) = emu.extensions
        assert record.state == "failed" and record.error[:2] == ("exit", "Extension.Test")
        assert wait_until(lambda: emu.returncode is not None, 5.0)
        assert "exit error of extension quitter" in emu.reset_reason
        with pytest.raises(RuntimeExitedError):
            emu.invoke({"i": 2}, timeout=5)


def test_the_deadline_covers_the_extension_too(tmp_path):
    """An extension still busy at deadlineMs times the invocation out; Lambda resets the
    sandbox (the response had already gone out)."""
    env = {"KLIME_TEST_EXTENSION": "overtime", "KLIME_TEST_EXTENSION_DELAY": "5"}
    with emulator("echo", env=env) as emu:
        started = time.monotonic()
        inv = emu.invoke({"i": 1}, deadline_ms=700)
        assert inv.ok and inv.duration < 0.5
        assert wait_until(lambda: inv.timed_out, 5.0)
        assert time.monotonic() - started < 3.0
        assert inv.ended_at is None
        assert "timeout" in emu.reset_reason
        assert wait_until(lambda: emu.returncode is not None, 5.0)


def test_a_runtime_past_its_deadline_times_out():
    with emulator("sleepy") as emu:
        inv = emu.invoke({"s": 5}, deadline_ms=500, timeout=5)
        assert not inv.ok and inv.timed_out
        assert inv.error_type == "Sandbox.Timedout"
        assert inv.duration < 2.0


def test_external_extension_gets_invoke_and_shutdown(tmp_path):
    log = tmp_path / "external.log"
    script = os.path.join(HANDLERS_DIR, "lambda_external_extension.py")
    emu = emulator("echo", external_extensions=[script], env={"KLIME_TEST_EXTERNAL_LOG": str(log)}).start()
    try:
        (record,) = emu.extensions
        assert record.external and record.name == "lambda_external_extension.py"
        assert record.events == ("INVOKE", "SHUTDOWN")
        inv = emu.invoke({"x": 1})
        assert inv.ok and emu.wait_ended(inv) and emu.wait_frozen()
    finally:
        emu.stop()
    rows = [__import__("json").loads(line) for line in log.read_text().splitlines()]
    assert [r["event"]["eventType"] for r in rows] == ["INVOKE", "SHUTDOWN"]
    assert rows[0]["event"]["requestId"] == inv.request_id
    assert rows[1]["event"]["shutdownReason"] == "spindown"
    assert record.state == "gone"


def test_provisioned_concurrency_freezes_after_init():
    with emulator("echo", init_type="provisioned-concurrency") as emu:
        assert emu.wait_frozen(5.0), "Init done, no invocation yet: frozen until the first one"
        inv = emu.invoke({"x": 1})
        assert inv.ok and inv.payload["echo"] == {"x": 1}
        assert emu.wait_frozen(5.0) and emu.freezes == 2


def test_snap_start_calls_restore_next_after_init():
    with emulator("echo", init_type="snap-start") as emu:
        assert emu.snapshot_at is not None and emu.snapshot_at <= emu.init_done_at
        inv = emu.invoke({"x": 1})
        assert inv.ok, emu.log_tail()
        assert emu.restore_error is None
