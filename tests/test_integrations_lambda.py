"""@klime_lambda (src/klime/integrations/lambda/, logic in integrations/_serverless.py).

First in this process (how the decorator finds clients, bounds its flush, and never changes
the handler's outcome), then on the real Lambda runtime client (awslambdaric) driven by
tests/support/lambda_emulator.py, which freezes the runtime (SIGSTOP) as soon as it asks
for the next invocation: every event an invocation tracked must have reached the collector
before the emulator received that invocation's response.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import klime
from conftest import WRITE_KEY, conserved, wait_until
from klime import InvocationTransport, klime_lambda
from klime.devserver import Fault
from klime.errors import ConfigurationError
from klime.integrations import _lambda, _serverless
from support.arrivals import arrivals

APPS = Path(__file__).resolve().parent / "apps" / "serverless"
SRC = Path(__file__).resolve().parent.parent / "src"


class Context:
    """The two things the decorator reads from a Lambda context."""

    def __init__(self, remaining_ms: int) -> None:
        self._end = time.monotonic() + remaining_ms / 1000.0
        self.aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._end - time.monotonic()) * 1000))


class SpyTransport(InvocationTransport):
    """An invocation transport that records the timeouts it is flushed with."""

    def __init__(self, **options):
        super().__init__(**options)
        self.flush_timeouts = []
        self.begun = 0

    def begin_invocation(self):
        self.begun += 1
        super().begin_invocation()

    def flush(self, timeout=None):
        self.flush_timeouts.append(timeout)
        return super().flush(timeout)


class BrokenTransport(InvocationTransport):
    """Fails where the decorator calls it (until ``broken`` is cleared)."""

    broken = True

    def begin_invocation(self):
        if self.broken:
            raise RuntimeError("klime bug in begin_invocation")

    def flush(self, timeout=None):
        if self.broken:
            raise RuntimeError("klime bug in flush")
        return super().flush(timeout)


@pytest.fixture(autouse=True)
def _fresh_warnings():
    for key in ("invocation-leftovers", "serverless-unsent", "after-response-fallback"):
        klime._logging.log.reset_once(key)
    extension_module = importlib.import_module("klime.integrations.lambda._extension")
    extension_module._reset()
    yield
    extension_module._reset()


# ---------------------------------------------------------------------------------------
# Importing


def test_importable_three_ways_without_boto3():
    code = (
        "import importlib, sys\n"
        "import klime\n"
        "from klime import klime_lambda\n"
        "from klime.integrations import klime_lambda as via_integrations\n"
        "module = importlib.import_module('klime.integrations.lambda')\n"
        "assert module.klime_lambda is klime_lambda is via_integrations\n"
        "assert klime.klime_cloud_function is not None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))\n"
    )
    env = {"PYTHONPATH": str(SRC), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_forwarder_names_resolve_lazily(monkeypatch):
    package = importlib.import_module("klime.integrations.lambda")
    fake = types.ModuleType("klime.integrations.lambda.forwarder")
    fake.make_sqs_forwarder = object()
    fake.sqs_forwarder_handler = object()
    monkeypatch.setitem(sys.modules, "klime.integrations.lambda.forwarder", fake)
    assert package.make_sqs_forwarder is fake.make_sqs_forwarder
    assert package.sqs_forwarder_handler is fake.sqs_forwarder_handler
    with pytest.raises(AttributeError):
        package.no_such_name  # noqa: B018


# ---------------------------------------------------------------------------------------
# In this process


def test_bare_and_configured_forms(make_client, collector):
    client = make_client(transport="invocation")

    @klime_lambda(client=client)
    def with_client(event, context):
        client.track("Configured", user_id="u")
        return "configured"

    @klime_lambda()
    def empty_parens(event, context):
        return "parens"

    assert with_client.__name__ == "with_client"
    assert with_client({}, Context(3000)) == "configured"
    assert empty_parens({}, Context(3000)) == "parens"
    assert [e["event"] for e in collector.events()] == ["Configured"]


def test_bare_decorator_uses_the_default_client_from_the_environment(monkeypatch, collector):
    monkeypatch.setenv("KLIME_WRITE_KEY", WRITE_KEY)
    monkeypatch.setenv("KLIME_ENDPOINT", collector.url)
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "fn")

    @klime_lambda
    def handler(event, context):
        klime.track("Default", {"n": event["n"]}, user_id="u")
        return {"ok": event["n"]}

    assert handler({"n": 1}, Context(3000)) == {"ok": 1}
    assert handler({"n": 2}, Context(3000)) == {"ok": 2}
    assert klime.client is not None and klime.client.transport.name == "invocation"
    assert [e["properties"]["n"] for e in collector.events()] == [1, 2]


def test_bare_decorator_also_flushes_clients_created_at_import(make_client, collector):
    module_client = make_client(transport="invocation")  # KLIME_WRITE_KEY is not set

    @klime_lambda
    def handler(event, context):
        module_client.track("Module Client", user_id="u")
        return "ok"

    assert handler({}, Context(3000)) == "ok"
    assert [e["event"] for e in collector.events()] == ["Module Client"]


def test_a_client_with_a_background_transport_is_flushed_too(make_client, collector):
    client = make_client(transport="background", flush_interval=60_000)  # would wait a minute

    @klime_lambda(client=client)
    def handler(event, context):
        client.track("Background", user_id="u")
        return "ok"

    assert handler({}, Context(3000)) == "ok"
    assert [e["event"] for e in collector.events()] == ["Background"]


def test_flushes_when_the_handler_raises_and_reraises_the_same_exception(make_client, collector):
    client = make_client(transport="invocation")
    raised = ValueError("user error")

    @klime_lambda(client=client)
    def handler(event, context):
        client.track("Before Raise", user_id="u")
        raise raised

    with pytest.raises(ValueError) as info:
        handler({}, Context(3000))
    assert info.value is raised
    assert info.traceback[-1].name == "handler"  # the user's frame is where it came from
    assert [e["event"] for e in collector.events()] == ["Before Raise"]


def test_flush_is_bounded_by_the_remaining_time_minus_the_margin(make_client):
    spy = SpyTransport()
    client = make_client(transport=spy)

    @klime_lambda(client=client, flush_timeout=30, deadline_margin=0.5)
    def handler(event, context):
        return "ok"

    handler({}, Context(2000))
    assert spy.begun == 1
    (timeout,) = spy.flush_timeouts
    assert 0 < timeout <= 1.5

    @klime_lambda(client=client, flush_timeout=0.7)
    def short(event, context):
        return "ok"

    short({}, Context(60_000))
    assert 0 < spy.flush_timeouts[-1] <= 0.7

    short({}, None)  # no context (a local call): flush_timeout alone
    assert 0 < spy.flush_timeouts[-1] <= 0.7

    handler({}, Context(100))  # less left than the margin: nothing to wait for
    assert spy.flush_timeouts[-1] == 0


def test_events_the_deadline_kept_go_with_the_next_invocation(make_client, collector, caplog_klime):
    client = make_client(transport="invocation", max_batch_size=10)

    @klime_lambda(client=client, deadline_margin=0.1)
    def handler(event, context):
        for i in range(event["n"]):
            client.track("Deadline", {"tag": event["tag"], "i": i}, user_id="u")
        return client.stats()

    collector.set_mode(Fault.blackhole())
    started = time.monotonic()
    handler({"n": 25, "tag": "first"}, Context(400))
    assert time.monotonic() - started < 5, "the flush must stop at the invocation's deadline"
    assert client.stats()["queued"] == 25 and conserved(client.stats())
    assert (
        sum(
            "could not be sent before the invocation's deadline" in r.getMessage()
            for r in caplog_klime.records
        )
        == 1
    )

    collector.set_mode(None)
    before_flush = handler({"n": 1, "tag": "second"}, Context(3000))
    assert before_flush["queued"] == 26
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 26
    assert client.stats()["queued"] == 0 and conserved(client.stats())


def test_sdk_failures_never_hide_the_outcome(make_client, caplog_klime):
    transport = BrokenTransport()
    client = make_client(transport=transport)

    @klime_lambda(client=client)
    def ok(event, context):
        return {"result": 42}

    @klime_lambda(client=client)
    def fails(event, context):
        raise KeyError("user's")

    assert ok({}, Context(3000)) == {"result": 42}
    with pytest.raises(KeyError, match="user's"):
        fails({}, Context(3000))
    messages = [r.getMessage() for r in caplog_klime.records]
    assert any("could not prepare the invocation" in m for m in messages)
    assert any("failed; the handler's outcome is unchanged" in m for m in messages)
    transport.broken = False


def test_broken_context_is_tolerated(make_client, collector):
    client = make_client(transport="invocation")

    class BadContext:
        def get_remaining_time_in_millis(self):
            raise RuntimeError("no deadline today")

    @klime_lambda(client=client)
    def handler(event, context):
        client.track("E", user_id="u")
        return "ok"

    assert handler({}, BadContext()) == "ok"
    assert len(collector.events()) == 1


def test_async_handler_becomes_a_plain_function(make_client, collector):
    client = make_client(transport="invocation")
    loops = []

    @klime_lambda(client=client)
    async def handler(event, context):
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        client.track("Async", {"n": event["n"]}, user_id="u")
        if event.get("raise"):
            raise RuntimeError("async failure")
        return event["n"] * 2

    assert not inspect.iscoroutinefunction(handler)
    assert handler({"n": 1}, Context(3000)) == 2
    assert handler({"n": 2}, Context(3000)) == 4
    with pytest.raises(RuntimeError, match="async failure"):
        handler({"n": 3, "raise": True}, Context(3000))
    assert [e["properties"]["n"] for e in collector.events()] == [1, 2, 3]
    assert loops[0] is loops[1] is loops[2], "one event loop across warm invocations"


def test_async_handler_called_inside_a_running_loop_is_refused(make_client):
    client = make_client(transport="invocation")

    @klime_lambda(client=client)
    async def handler(event, context):
        return 1

    async def main():
        return handler({}, Context(1000))

    with pytest.raises(ConfigurationError, match="running event loop"):
        asyncio.run(main())


@pytest.mark.parametrize(
    "options",
    [
        {"client": "not a client"},
        {"flush_timeout": -1},
        {"flush_timeout": "2"},
        {"deadline_margin": None},
        {"deadline_margin": float("nan")},
        {"after_response": "yes"},
    ],
)
def test_bad_options_are_refused_at_decoration(options):
    with pytest.raises(ConfigurationError):
        klime_lambda(**options)


def test_decorating_a_non_function_is_refused():
    with pytest.raises(ConfigurationError):
        klime_lambda(client=None)(42)


def test_nested_invocations_restore_the_deadline(make_client):
    client = make_client(transport="invocation")
    from klime.transports.invocation import invocation_deadline

    seen = []

    @klime_lambda(client=client)
    def inner(event, context):
        seen.append(invocation_deadline())
        return "inner"

    @klime_lambda(client=client)
    def outer(event, context):
        seen.append(invocation_deadline())
        inner({}, Context(500))
        seen.append(invocation_deadline())
        return "outer"

    assert outer({}, Context(3000)) == "outer"
    assert seen[0] is seen[2] and seen[1] is not seen[0]
    assert invocation_deadline() is None


def test_live_clients_exclude_shut_down_ones(make_client):
    client = make_client(transport="invocation")
    assert any(c is client for c in _serverless._live_clients())
    client.shutdown()
    assert all(c is not client for c in _serverless._live_clients())


# ---------------------------------------------------------------------------------------
# On the real Lambda runtime client

requires_awslambdaric = pytest.mark.skipif(
    importlib.util.find_spec("awslambdaric") is None, reason="awslambdaric is not installed"
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support.lambda_emulator import LambdaEmulator  # noqa: E402


@pytest.fixture
def lambda_runtime(collector):
    """Start awslambdaric on a handler of tests/apps/serverless/lambda_app.py; always stopped."""
    started = []

    def start(handler, **env):
        base = {"KLIME_WRITE_KEY": WRITE_KEY, "KLIME_ENDPOINT": collector.url}
        base["KLIME_TEST_RETRY_DELAY_MS"] = "10"
        base.update({k: str(v) for k, v in env.items()})
        emulator = LambdaEmulator("lambda_app." + handler, cwd=APPS, env=base, freeze=True, timeout_s=10)
        started.append(emulator)
        return emulator.start()

    yield start
    for emulator in started:
        # Let a freeze in progress finish first: stopping during one costs the emulator a
        # 2 s wait (its SIGCONT races the freeze's wait for every thread to stop).
        emulator.wait_frozen(2.0)
        emulator.stop()


def assert_arrived_before(collector, tag, n, invocation):
    got = arrivals(collector, tag)
    assert len(got) == len({m for m, _ in got}) == n, f"{tag}: {len(got)} of {n} events arrived"
    late = [at - invocation.responded_at for _, at in got if at > invocation.responded_at]
    assert not late, f"{tag}: {len(late)} events arrived after the response"


@requires_awslambdaric
def test_every_event_arrives_before_the_response(lambda_runtime, collector):
    emu = lambda_runtime("tracked")
    for tag, n in (("one", 1), ("batch", 20), ("many", 250)):
        inv = emu.invoke({"tag": tag, "n": n})
        assert inv.ok, emu.log_tail()
        assert inv.payload["transport"] == "invocation"
        assert_arrived_before(collector, tag, n, inv)
        assert emu.wait_frozen(), "the runtime asked for the next invocation and was frozen"


@requires_awslambdaric
def test_events_arrive_before_the_error_when_the_handler_raises(lambda_runtime, collector):
    emu = lambda_runtime("tracked")
    inv = emu.invoke({"tag": "boom", "n": 7, "raise": True})
    assert not inv.ok
    assert inv.error_type == "ValueError"
    assert inv.payload["errorMessage"] == "handler failed: boom"
    assert_arrived_before(collector, "boom", 7, inv)


@requires_awslambdaric
def test_a_500_is_retried_before_the_response(lambda_runtime, collector):
    emu = lambda_runtime("tracked")
    collector.respond(Fault.status_code(500))
    inv = emu.invoke({"tag": "retried", "n": 5})
    assert inv.ok, emu.log_tail()
    assert [r.status for r in collector.requests()] == [500, 200]
    first, retry = collector.requests()
    assert first.json() == retry.json(), "the retry resends the same events"
    assert_arrived_before(collector, "retried", 5, inv)


@requires_awslambdaric
def test_a_short_deadline_never_hangs_and_the_rest_goes_next_time(lambda_runtime, collector):
    emu = lambda_runtime("tracked", KLIME_TEST_MARGIN=0.8)
    collector.set_mode(Fault.blackhole())

    first = emu.invoke({"tag": "cut", "n": 30}, deadline_ms=2000)

    assert first.ok, emu.log_tail()
    assert first.duration < 2.0, "the response must come before the function's deadline"
    assert arrivals(collector, "cut") == []
    assert emu.wait_frozen()

    collector.set_mode(None)
    second = emu.invoke({"tag": "next", "n": 1})
    assert second.ok, emu.log_tail()
    assert second.payload["stats"]["queued"] == 31, "the 30 cut off were kept, and counted"
    assert_arrived_before(collector, "cut", 30, second)
    assert_arrived_before(collector, "next", 1, second)
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 31


@requires_awslambdaric
def test_fifty_warm_invocations_reuse_one_client_and_one_connection(lambda_runtime, collector):
    emu = lambda_runtime("tracked")
    payloads = []
    for i in range(50):
        inv = emu.invoke({"tag": f"warm-{i}", "n": 1 + i % 5})
        assert inv.ok, emu.log_tail()
        assert_arrived_before(collector, f"warm-{i}", 1 + i % 5, inv)
        payloads.append(inv.payload)
    assert len({(p["pid"], p["client"]) for p in payloads}) == 1
    assert len([r for r in collector.requests() if r.status == 200]) == 50
    assert collector.connection_count() == 1


@requires_awslambdaric
def test_a_connection_gone_stale_while_frozen_is_retried_at_once(lambda_runtime, collector):
    # With a 60 s backoff a retry-after-backoff could not finish within the 10 s deadline:
    # the events could then not arrive before the response.
    emu = lambda_runtime("tracked", KLIME_TEST_RETRY_DELAY_MS=60_000)
    inv = emu.invoke({"tag": "warm", "n": 1})
    assert inv.ok and collector.connection_count() == 1
    assert emu.wait_frozen()

    # While frozen, the peer drops the connection and answers its next use with a reset
    # (what a NAT or load balancer that forgot the connection does).
    collector.respond(Fault.reset_before_read())
    inv = emu.invoke({"tag": "after-reset", "n": 3})
    assert inv.ok, emu.log_tail()
    assert_arrived_before(collector, "after-reset", 3, inv)
    assert [r.fault for r in collector.requests()][-2:] == ["reset_before_read", None]
    assert collector.connection_count() == 2
    assert emu.wait_frozen()

    # While frozen, the peer closes the idle connection (a FIN waits for the thawed client).
    assert collector.close_idle_connections() == 1
    inv = emu.invoke({"tag": "after-close", "n": 2})
    assert inv.ok, emu.log_tail()
    assert_arrived_before(collector, "after-close", 2, inv)
    assert inv.payload["stats"]["retries"] == 1  # the reset above; the close cost no retry
    assert collector.connection_count() == 3


@requires_awslambdaric
def test_async_handler_on_the_runtime(lambda_runtime, collector):
    emu = lambda_runtime("async_tracked")
    for tag in ("async-1", "async-2"):
        inv = emu.invoke({"tag": tag, "n": 25})
        assert inv.ok, emu.log_tail()
        assert inv.payload["transport"] == "invocation"
        assert_arrived_before(collector, tag, 25, inv)


@requires_awslambdaric
def test_bare_decorator_on_the_runtime(lambda_runtime, collector):
    emu = lambda_runtime("bare")
    inv = emu.invoke({"tag": "bare", "n": 3})
    assert inv.ok, emu.log_tail()
    assert inv.payload == {"default_transport": "invocation"}
    assert_arrived_before(collector, "bare", 3, inv)  # the default client
    assert_arrived_before(collector, "bare-module", 3, inv)  # the module's own client


@requires_awslambdaric
def test_without_the_decorator_leftovers_go_next_invocation_with_one_warning(lambda_runtime, collector):
    emu = lambda_runtime("undecorated")

    inv = emu.invoke({"tag": "full", "n": 20})  # a full batch is sent inline
    assert inv.ok, emu.log_tail()
    assert_arrived_before(collector, "full", 20, inv)

    inv = emu.invoke({"tag": "left", "n": 3})  # below a batch: left in the buffer
    assert inv.ok and inv.payload["stats"]["queued"] == 3
    assert arrivals(collector, "left") == []
    assert emu.wait_frozen()

    inv = emu.invoke({"tag": "next", "n": 1})  # a new invocation: the leftovers go now
    assert_arrived_before(collector, "left", 3, inv)
    assert_arrived_before(collector, "next", 1, inv)

    emu.invoke({"tag": "left-again", "n": 2})
    inv = emu.invoke({"tag": "again", "n": 1})
    assert_arrived_before(collector, "left-again", 2, inv)
    emu.wait_frozen()
    emu.stop()
    log = emu.log_tail(1000)
    assert log.count("events recorded before this invocation were still waiting") == 1, log
    assert "@klime_lambda" in log


@requires_awslambdaric
def test_control_a_background_thread_is_frozen_with_its_events(lambda_runtime, collector):
    """Why the decorator exists: without it, a background sender (flushing every 500 ms)
    is frozen before it sends. The events were queued, not lost: a later flush sends them."""
    emu = lambda_runtime("background_undecorated")
    inv = emu.invoke({"tag": "frozen", "n": 3})
    assert inv.ok, emu.log_tail()
    assert emu.wait_frozen()
    assert not wait_until(lambda: arrivals(collector, "frozen"), timeout=1.0), "sent while frozen?"

    # Thawed, the thread may now send them itself; the handler's own flush makes sure.
    inv = emu.invoke({"tag": "thaw", "n": 0, "flush": True})
    assert_arrived_before(collector, "frozen", 3, inv)


# ---------------------------------------------------------------------------------------
# After the response (@klime_lambda(after_response=True)): in this process


class FakeExtension:
    """Plays klime's Lambda extension for the wrapper: takes (or refuses) invocations and
    keeps what was handed over."""

    def __init__(self, take=True):
        self.take = take
        self.begun = []
        self.handed = []

    def begin(self, wrapper, request_id):
        self.begun.append(request_id)
        return self.take

    def end(self, request_id, invocation, wrapper_frame, wrapper):
        self.handed.append((request_id, invocation, wrapper_frame))
        return self.take


def after_response_wrapper(fn, client, extension):
    options = _serverless.Options("@klime_lambda", client, 2.0, 0.25, True)
    return _lambda._wrap_after_response(fn, options, _lambda._remaining_seconds, extension)


def test_the_extension_recognises_after_response_wrappers_through_other_decorators(make_client):
    extension_module = importlib.import_module("klime.integrations.lambda._extension")
    client = make_client(transport="invocation")

    def handler(event, context):
        return "ok"

    wrapper = after_response_wrapper(handler, client, None)

    @functools.wraps(wrapper)
    def outer(event, context):  # another decorator, applied on top of klime's
        return wrapper(event, context)

    assert extension_module._is_after_response_wrapper(wrapper)
    assert extension_module._is_after_response_wrapper(outer)
    assert not extension_module._is_after_response_wrapper(handler)
    assert not extension_module._is_after_response_wrapper(klime_lambda(client=client)(handler))
    assert wrapper({}, Context(3000)) == "ok"  # no extension: it flushes before returning


def test_not_on_lambda_after_response_falls_back_with_one_warning(
    make_client, collector, caplog_klime, monkeypatch
):
    monkeypatch.delenv("AWS_LAMBDA_RUNTIME_API", raising=False)
    client = make_client(transport="invocation")

    @klime_lambda(client=client, after_response=True)
    def handler(event, context):
        client.track("Fallback", {"n": event["n"]}, user_id="u")
        return event["n"]

    @klime_lambda(client=client, after_response=True)  # a second one: no second warning
    def other(event, context):
        return "other"

    assert handler({"n": 1}, Context(3000)) == 1
    assert [e["properties"]["n"] for e in collector.events()] == [1], "sent before it returned"
    assert other({}, Context(3000)) == "other"
    warnings = [r.getMessage() for r in caplog_klime.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert "after_response=True" in warnings[0] and "AWS_LAMBDA_RUNTIME_API is not set" in warnings[0]
    assert "sent before the handler returns" in warnings[0]


def test_after_response_wrapper_hands_the_invocation_over_instead_of_flushing(make_client, collector):
    client = make_client(transport="invocation")
    extension = FakeExtension(take=True)

    def handler(event, context):
        client.track("Handed Over", user_id="u")
        return {"same": "object"}

    wrapped = after_response_wrapper(handler, client, extension)
    context = Context(3000)
    result = wrapped({}, context)
    assert result == {"same": "object"}
    assert extension.begun == ["req-1"]
    ((request_id, invocation, frame),) = extension.handed
    assert request_id == "req-1" and frame is not None
    assert collector.events() == [] and client.stats()["queued"] == 1, "nothing sent before the return"
    invocation.flush()  # what klime's extension thread does after the response
    assert [e["event"] for e in collector.events()] == ["Handed Over"]
    assert conserved(client.stats()) and client.stats()["queued"] == 0


def test_after_response_wrapper_flushes_itself_when_the_extension_declines(make_client, collector):
    client = make_client(transport="invocation")
    extension = FakeExtension(take=False)

    def handler(event, context):
        client.track("Declined", user_id="u")
        return "ok"

    assert after_response_wrapper(handler, client, extension)({}, Context(3000)) == "ok"
    assert [e["event"] for e in collector.events()] == ["Declined"]
    assert extension.handed == [], "a declined begin is never ended"


def test_after_response_wrapper_passes_the_exception_through(make_client, collector):
    client = make_client(transport="invocation")
    extension = FakeExtension(take=True)
    raised = KeyError("user's")

    def handler(event, context):
        client.track("Raised", user_id="u")
        raise raised

    with pytest.raises(KeyError) as info:
        after_response_wrapper(handler, client, extension)({}, Context(3000))
    assert info.value is raised
    assert info.traceback[-1].name == "handler"
    assert len(extension.handed) == 1 and collector.events() == []


def test_a_decorated_call_inside_a_served_invocation_leaves_its_events_to_it(make_client, collector):
    client = make_client(transport="invocation")
    extension = FakeExtension(take=True)

    def inner(event, context):
        client.track("Inner", user_id="u")
        return "inner"

    inner_wrapped = after_response_wrapper(inner, client, extension)

    def outer(event, context):
        assert inner_wrapped({}, context) == "inner"
        assert collector.events() == [], "the inner call did not flush"
        return "outer"

    assert after_response_wrapper(outer, client, extension)({}, Context(3000)) == "outer"
    assert extension.begun == ["req-1"] and len(extension.handed) == 1  # the outer only
    extension.handed[0][1].flush()
    assert [e["event"] for e in collector.events()] == ["Inner"]


def test_without_a_request_id_there_is_nothing_to_hand_over(make_client, collector):
    client = make_client(transport="invocation")

    class Declines(FakeExtension):
        def begin(self, wrapper, request_id):
            self.begun.append(request_id)
            return request_id is not None  # what LambdaExtension.begin does

    extension = Declines()

    def handler(event, context):
        client.track("Local Call", user_id="u")
        return "ok"

    assert after_response_wrapper(handler, client, extension)({}, None) == "ok"
    assert extension.begun == [None] and [e["event"] for e in collector.events()] == ["Local Call"]


# ---------------------------------------------------------------------------------------
# After the response: on the real Lambda runtime client


@pytest.fixture
def after_runtime(collector):
    """Start awslambdaric on tests/apps/serverless/<module>.<handler>; always stopped."""
    started = []

    def start(handler, *, init_type="on-demand", timeout_s=10, **env):
        base = {
            "KLIME_WRITE_KEY": WRITE_KEY,
            "KLIME_ENDPOINT": collector.url,
            "KLIME_TEST_RETRY_DELAY_MS": "10",
        }
        base.update({k: str(v) for k, v in env.items()})
        if "." not in handler:
            handler = "lambda_after_app." + handler
        emulator = LambdaEmulator(
            handler, cwd=APPS, env=base, freeze=True, timeout_s=timeout_s, init_type=init_type
        )
        started.append(emulator)
        return emulator.start()

    yield start
    for emulator in started:
        emulator.wait_frozen(2.0)
        emulator.stop()


def assert_after_response(emu, collector, tag, n, invocation):
    """All ``n`` events of ``tag`` arrived once, after the response reached the invoker and
    before the invocation ended (runtime and klime's extension called next: the freeze)."""
    assert emu.wait_ended(invocation), f"{tag}: the invocation never ended\n{emu.log_tail()}"
    got = arrivals(collector, tag)
    assert len(got) == len({m for m, _ in got}) == n, f"{tag}: {len(got)} of {n} events arrived"
    early = [invocation.responded_at - at for _, at in got if at <= invocation.responded_at]
    assert not early, f"{tag}: {len(early)} events reached the collector before the response"
    late = [at - invocation.ended_at for _, at in got if at > invocation.ended_at]
    assert not late, f"{tag}: {len(late)} events arrived after the invocation ended"


@requires_awslambdaric
def test_after_response_registers_during_init_as_an_internal_extension(after_runtime):
    emu = after_runtime("handler")
    (record,) = emu.extensions
    assert (record.name, record.events, record.external) == ("klime", ("INVOKE",), False)
    assert record.state == "waiting", "klime's thread called next: Init could complete"


@requires_awslambdaric
def test_after_response_fifty_warm_invocations(after_runtime, collector):
    emu = after_runtime("handler")
    for i in range(50):
        n = 1 + i % 30
        inv = emu.invoke({"tag": f"warm-{i}", "n": n})
        assert inv.ok, emu.log_tail()
        stats = inv.payload["stats"]
        assert stats["queued"] == n, "at the return only this invocation's events wait: the rest went"
        assert conserved(stats)
        assert_after_response(emu, collector, f"warm-{i}", n, inv)
        assert emu.wait_frozen(), "frozen once klime called next"
        assert emu.frozen_at >= inv.ended_at
        assert not inv.timed_out
    assert emu.extension("klime").next_calls == 51
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == sum(1 + i % 30 for i in range(50))
    # keep-alive across warm invocations: no new connection per invocation (a flush of two
    # batches may use two of the sender's pooled connections at once)
    assert collector.connection_count() <= 4


@requires_awslambdaric
def test_after_response_with_next_polled_from_a_thread(after_runtime, collector):
    """Lambda's Python 3.12+ runtimes make awslambdaric wait for the next event on a worker
    thread while the main thread runs the handler: the order holds there too."""
    emu = after_runtime("handler", AWS_EXECUTION_ENV="AWS_Lambda_python3.12")
    for i in range(10):
        inv = emu.invoke({"tag": f"threaded-{i}", "n": 1 + 7 * i})
        assert inv.ok, emu.log_tail()
        assert_after_response(emu, collector, f"threaded-{i}", 1 + 7 * i, inv)


@requires_awslambdaric
def test_after_response_after_a_cold_start_with_events_from_init(after_runtime, collector):
    emu = after_runtime("handler", KLIME_TEST_INIT_EVENTS=7)
    assert arrivals(collector, "init") == [], "events tracked during Init wait (Init must stay short)"
    inv = emu.invoke({"tag": "cold", "n": 40})
    assert inv.ok, emu.log_tail()
    assert_after_response(emu, collector, "init", 7, inv)
    assert_after_response(emu, collector, "cold", 40, inv)


@requires_awslambdaric
def test_after_response_with_a_slow_collector_the_invoker_does_not_wait(after_runtime, collector):
    collector.set_mode(Fault.slow(0.2))
    emu = after_runtime("handler")
    for i in range(3):
        inv = emu.invoke({"tag": f"slow-{i}", "n": 100})
        assert inv.ok, emu.log_tail()
        assert inv.duration < 0.2, (
            f"the invoker waited {inv.duration:.3f}s: klime's requests were on its path"
        )
        assert_after_response(emu, collector, f"slow-{i}", 100, inv)
        assert inv.post_runtime >= 0.2, "the answers (200 ms each) come in the post-runtime window"


@requires_awslambdaric
def test_after_response_when_the_handler_raises(after_runtime, collector):
    emu = after_runtime("handler")
    inv = emu.invoke({"tag": "boom", "n": 9, "raise": True})
    assert not inv.ok
    assert inv.error_type == "ValueError"
    assert inv.payload["errorMessage"] == "handler failed: boom"
    assert_after_response(emu, collector, "boom", 9, inv)
    again = emu.invoke({"tag": "after-boom", "n": 2})
    assert again.ok and again.payload["stats"]["queued"] == 2
    assert_after_response(emu, collector, "after-boom", 2, again)


@requires_awslambdaric
def test_after_response_async_handler(after_runtime, collector):
    emu = after_runtime("async_handler")
    for tag in ("async-1", "async-2"):
        inv = emu.invoke({"tag": tag, "n": 25})
        assert inv.ok, emu.log_tail()
        assert_after_response(emu, collector, tag, 25, inv)
    inv = emu.invoke({"tag": "async-boom", "n": 3, "raise": True})
    assert not inv.ok and inv.payload["errorMessage"] == "async handler failed: async-boom"
    assert_after_response(emu, collector, "async-boom", 3, inv)


@requires_awslambdaric
def test_after_response_a_black_hole_never_stretches_the_invocation_past_its_deadline(
    after_runtime, collector
):
    emu = after_runtime("handler", KLIME_TEST_MARGIN=0.3, KLIME_TEST_BUDGET=30)
    collector.set_mode(Fault.blackhole())
    first = emu.invoke({"tag": "cut", "n": 30}, deadline_ms=1500)
    assert first.ok, emu.log_tail()
    assert first.duration < 0.5
    assert emu.wait_ended(first, 5.0), "klime called next before the deadline"
    assert not first.timed_out and first.ended_at < first.deadline_at
    assert first.ended_at - first.invoked_at >= 1.0, (
        "klime used the window up to the deadline minus the margin"
    )
    assert arrivals(collector, "cut") == []
    assert emu.wait_frozen()

    collector.set_mode(None)
    second = emu.invoke({"tag": "next", "n": 1})
    assert second.ok, emu.log_tail()
    assert second.payload["stats"]["queued"] == 31, "the 30 cut off stayed queued, and counted"
    assert conserved(second.payload["stats"])
    assert_after_response(emu, collector, "cut", 30, second)
    assert_after_response(emu, collector, "next", 1, second)
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 31, "sent once each"


@requires_awslambdaric
def test_after_response_decorated_after_init_falls_back_with_one_warning(after_runtime, collector):
    emu = after_runtime("lambda_late_app.handler")
    for tag, n in (("late-1", 3), ("late-2", 2)):
        inv = emu.invoke({"tag": tag, "n": n})
        assert inv.ok, emu.log_tail()
        assert_arrived_before(collector, tag, n, inv)  # flushed before the response
    assert emu.extensions == []
    assert emu.refused_registrations and emu.refused_registrations[0][:2] == ("klime", 403)
    emu.wait_frozen()
    emu.stop()
    log = emu.log_tail(1000)
    assert log.count("cannot send after the response") == 1, log
    assert "refused the registration" in log and "only possible during Init" in log


@requires_awslambdaric
def test_after_response_when_lambda_calls_another_function(after_runtime, collector):
    emu = after_runtime("not_the_decorated_one")
    for tag in ("other-1", "other-2"):
        inv = emu.invoke({"tag": tag, "n": 4})
        assert inv.ok, emu.log_tail()
        assert_arrived_before(collector, tag, 4, inv)
        assert emu.wait_ended(inv)
        assert inv.post_runtime < 0.5, "klime's extension did not wait for a hand-over that never comes"
    emu.wait_frozen()
    emu.stop()
    log = emu.log_tail(1000)
    assert log.count("is not the one decorated") == 1, log


@requires_awslambdaric
def test_after_response_with_provisioned_concurrency(after_runtime, collector):
    """Init runs long before the first invocation and the sandbox is frozen in between:
    events from Init go with the first invocation, after its response; a connection that
    went stale meanwhile costs nothing."""
    emu = after_runtime("handler", init_type="provisioned-concurrency", KLIME_TEST_INIT_EVENTS=5)
    assert emu.wait_frozen(5.0), "frozen after Init until the first invocation"
    assert arrivals(collector, "init") == []
    warm = emu.invoke({"tag": "first", "n": 5})
    assert warm.ok, emu.log_tail()
    assert_after_response(emu, collector, "init", 5, warm)
    assert_after_response(emu, collector, "first", 5, warm)
    assert emu.wait_frozen()
    collector.close_idle_connections()  # the peer forgot the connection while frozen
    inv = emu.invoke({"tag": "second", "n": 3})
    assert inv.ok, emu.log_tail()
    assert_after_response(emu, collector, "second", 3, inv)
    assert inv.payload["stats"]["retries"] == 0, "a closed idle connection costs no retry"


@requires_awslambdaric
@pytest.mark.parametrize("handler", ["lambda_after_app.handler", "lambda_app.tracked"])
def test_snapstart_sends_init_events_before_the_snapshot_once(after_runtime, collector, handler):
    emu = after_runtime(handler, init_type="snap-start", KLIME_TEST_INIT_EVENTS=5)
    assert emu.snapshot_at is not None
    init = arrivals(collector, "init")
    assert len(init) == 5, "sent by the before-snapshot hook"
    assert all(at < emu.snapshot_at for _, at in init)
    inv = emu.invoke({"tag": "restored", "n": 2})
    assert inv.ok, emu.log_tail()
    assert emu.wait_ended(inv)
    assert len(arrivals(collector, "restored")) == 2
    assert len(arrivals(collector, "init")) == 5, "not sent again after the restore"
    ids = collector.message_ids()
    assert len(ids) == len(set(ids)) == 7


@requires_awslambdaric
def test_concurrent_flush_after_response_250_events_at_50ms_at_once(after_runtime, collector):
    """The extension's flush sends an invocation's 13 batches at once (issue 12, item 3)."""
    collector.set_mode(Fault.slow(0.05))
    emu = after_runtime("handler")
    warm = emu.invoke({"tag": "warm", "n": 1})
    assert emu.wait_ended(warm)
    collector.reset()
    collector.set_mode(Fault.slow(0.05))
    inv = emu.invoke({"tag": "many", "n": 250})
    assert inv.ok, emu.log_tail()
    assert_after_response(emu, collector, "many", 250, inv)
    # 13 batches: the warm invocation learnt that round trips are slow, so they all go at
    # once (about one round trip; the time is the benchmark's to measure, not this test's)
    assert collector.peak_in_flight >= 10, collector.peak_in_flight


@requires_awslambdaric
def test_concurrent_flush_before_return_250_events_at_50ms_at_once(lambda_runtime, collector):
    """13 batches of 20 at a 50 ms round trip go at once (issue 12, item 3): about one
    round trip, not thirteen (benchmarks/serverless_latency.py measures it)."""
    collector.set_mode(Fault.slow(0.05))
    emu = lambda_runtime("tracked")
    warm = emu.invoke({"tag": "warm", "n": 1})
    assert warm.ok, emu.log_tail()
    collector.reset()
    collector.set_mode(Fault.slow(0.05))
    inv = emu.invoke({"tag": "many", "n": 250})
    assert inv.ok, emu.log_tail()
    assert_arrived_before(collector, "many", 250, inv)
    assert collector.peak_in_flight >= 10, collector.peak_in_flight  # 13 batches, at once


@requires_awslambdaric
def test_the_latency_benchmark_runs_each_mode_on_the_runtime(collector):
    """benchmarks/serverless_latency.py's runtime section (small run): each mode runs,
    only after_response registers an extension, and every event was sent (it checks)."""
    spec = importlib.util.spec_from_file_location(
        "serverless_latency", Path(__file__).resolve().parent.parent / "benchmarks" / "serverless_latency.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = {
        mode: bench.runtime_latency(collector.url, mode, 5, 2, write_key=WRITE_KEY) for mode in bench.MODES
    }
    assert rows["none"]["extensions"] == rows["before"]["extensions"] == []
    assert rows["after"]["extensions"] == ["klime"]
    assert len(collector.message_ids()) == len(set(collector.message_ids())) == 2 * (2 + 3) * 5
    for row in rows.values():
        assert row["runs"] == 2 and row["latency_median_ms"] > 0 and row["post_median_ms"] >= 0
