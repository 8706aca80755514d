"""klime's documented API, used the way a typed application uses it.

Two checks in one file:

- ``mypy --strict examples/typed_usage.py`` must pass: every call below is typed as the
  docs describe it (tests/test_examples_typed.py runs it);
- ``python examples/typed_usage.py`` runs it all against klime's local collector on
  127.0.0.1 and exits 0 only if every check holds.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, Awaitable, Callable, Dict, List, MutableMapping, Optional, Sequence

import klime
from klime import (
    BackgroundTransport,
    BatchResponse,
    ConfigurationError,
    EventError,
    FlushResult,
    KlimeError,
    MemoryTransport,
    Sender,
    SendError,
    SendResult,
    ValidationError,
)
from klime.devserver import Collector, Fault
from klime.senders import batch_body
from klime.testing import CapturedEvents, capture

WRITE_KEY = "typed-example-key"


# --------------------------------------------------------------------------- callbacks


class Outcomes:
    """What the on_error / on_success callbacks saw."""

    def __init__(self) -> None:
        self.errors: List[SendError] = []
        self.failed_events: List[Dict[str, Any]] = []
        self.responses: List[BatchResponse] = []

    def on_error(self, error: SendError, events: List[Dict[str, Any]]) -> None:
        self.errors.append(error)
        self.failed_events.extend(events)

    def on_success(self, response: BatchResponse) -> None:
        self.responses.append(response)


# --------------------------------------------------------------------------- a custom sender


class ListSender(Sender):
    """Keeps each batch body in a list (WHERE); any transport decides WHEN."""

    max_batch_events = 50

    def __init__(self) -> None:
        self.bodies: List[bytes] = []

    def send(self, events: Sequence[bytes], deadline: Any) -> SendResult:
        self.bodies.append(batch_body(events))
        return SendResult(BatchResponse("ok", len(events)), requests=1)


# --------------------------------------------------------------------------- the checks


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SystemExit(f"typed_usage: FAILED: {what}")


def client_api(endpoint: str) -> None:
    outcomes = Outcomes()
    client = klime.Client(
        WRITE_KEY,
        endpoint=endpoint,
        flush_interval=500,  # ms
        max_batch_size=50,
        max_queue_size=1_000,
        retry_max_attempts=3,
        retry_initial_delay=10,  # ms
        flush_on_shutdown=True,
        on_error=outcomes.on_error,
        on_success=outcomes.on_success,
        exit_timeout=2.0,  # s
    )
    client.identify("user_123", {"email": "ada@example.com", "name": "Ada"})
    client.group("org_456", {"name": "Acme Inc"}, user_id="user_123")
    client.group("org_456", user_id=42)  # link only; int ids become strings
    client.track("Button Clicked", {"plan": "pro"}, user_id="user_123")
    client.track("Events Received", {"count": 100}, group_id="org_456")

    flushed: FlushResult = client.flush(timeout=5.0)
    check(flushed.ok and flushed.sent == 5 and not flushed.timed_out, f"flush: {flushed}")

    response: BatchResponse = client.track_sync("Signup", {"plan": "pro"}, user_id="user_123", timeout=5)
    check((response.status, response.accepted, response.failed) == ("ok", 1, 0), f"track_sync: {response}")
    errors: tuple[EventError, ...] = response.errors
    check(errors == () and response.status_code == 200, "no event errors")
    client.identify_sync("user_123", {"plan": "pro"})
    client.group_sync("org_456", {"seats": 10}, user_id="user_123")

    try:
        client.track("")  # no name, no user_id/group_id
    except ValidationError as error:
        check(isinstance(error, KlimeError) and isinstance(error, ValueError), "ValidationError")
    else:
        check(False, "track('') must raise ValidationError")

    stats: Dict[str, int] = client.stats()
    check(
        stats["tracked"] == stats["sent"] + stats["failed"] + stats["dropped"] + stats["queued"], "conserved"
    )

    with klime.Client("wrong-key", endpoint=endpoint, on_error=outcomes.on_error) as refused:
        try:
            refused.track_sync("Signup", user_id="user_123")
        except SendError as error:
            status: Optional[int] = error.status_code
            check(status == 401 and error.events[0]["event"] == "Signup" and not error.retryable, "401")
        refused.track("Queued", user_id="user_123")  # refused too, reported to on_error
    check([e.status_code for e in outcomes.errors] == [401], f"on_error: {outcomes.errors}")
    check([e["event"] for e in outcomes.failed_events] == ["Queued"], "on_error events")

    done: FlushResult = client.shutdown(timeout=5)
    check(done.ok and client.shutdown().sent == 0, "shutdown is idempotent")
    check(sum(r.accepted for r in outcomes.responses) == 8, f"on_success: {outcomes.responses}")


def transports_and_senders() -> None:
    sender = ListSender()
    with klime.Client(
        sender=sender, transport=BackgroundTransport(flush_interval=100, max_batch_size=10)
    ) as c:
        for i in range(25):
            c.track("Tick", {"i": i}, user_id=i)
        check(c.flush(timeout=5).sent == 25, "custom sender")
    check(len(sender.bodies) >= 3, f"batches of 10: {len(sender.bodies)}")

    memory = klime.Client("k", transport="memory")
    memory.track("Stored", user_id="u1")
    transport = memory.transport
    check(isinstance(transport, MemoryTransport) and transport.events[0]["event"] == "Stored", "memory")
    memory.shutdown()

    try:
        klime.Client("k", max_batch_size=0)
    except ConfigurationError as error:
        check("max_batch_size" in str(error), "ConfigurationError names the option")


def module_level(endpoint: str) -> None:
    klime.configure(logger=logging.getLogger("myapp.klime"))
    klime.client = klime.Client(WRITE_KEY, endpoint=endpoint)
    check(klime.get_client() is klime.client, "the default client")
    klime.identify("user_1", {"plan": "free"})
    klime.group("org_1", {"name": "Initech"}, user_id="user_1")
    klime.track("Logged In", user_id="user_1")
    check(klime.track_sync("Paid", {"amount": 9.5}, user_id="user_1").accepted == 1, "klime.track_sync")
    check(klime.identify_sync("user_1").accepted == 1, "klime.identify_sync")
    check(klime.group_sync("org_1", user_id="user_1").accepted == 1, "klime.group_sync")
    check(klime.flush(timeout=5).sent == 3, "klime.flush")
    klime.restart()  # a no-op here: nothing forked
    check(klime.shutdown(timeout=5).ok, "klime.shutdown")
    klime.client = None


async def async_api(endpoint: str) -> None:
    client = klime.Client(WRITE_KEY, endpoint=endpoint)
    client.track("Job Started", user_id="u1")  # no await: never blocks the loop
    response: BatchResponse = await client.atrack_sync(
        "Invoice Paid", {"amount": 120}, user_id="u1", timeout=5
    )
    await client.aidentify_sync("u1", {"email": "ada@example.com"})
    await client.agroup_sync("org_1", {"name": "Acme"}, user_id="u1")
    flushed: FlushResult = await client.aflush(timeout=5)
    done: FlushResult = await client.ashutdown(timeout=5)
    check(response.accepted == 1 and flushed.sent == 1 and done.ok, "async API")


ASGIApp = Callable[[MutableMapping[str, Any], Any, Any], Awaitable[None]]


def asgi_app() -> ASGIApp:
    async def app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return klime.asgi_lifespan(app, timeout=2.0)


@klime.klime_lambda
def lambda_handler(event: Dict[str, Any], context: Any) -> Dict[str, int]:
    klime.track("Lambda Called", user_id=str(event["user_id"]))
    return {"statusCode": 200}


@klime.klime_lambda(flush_timeout=2.0)
def lambda_handler_with_options(event: Dict[str, Any], context: Any) -> str:
    return "ok"


@klime.klime_cloud_function
def cloud_function(request: Any) -> str:
    klime.track("Function Called", user_id="u1")
    return "ok"


def testing_helpers() -> None:
    with capture() as events:
        captured: CapturedEvents = events
        klime.track("Signup", {"plan": "pro"}, user_id=7)
        klime.identify(7, {"plan": "pro"})
    event: Dict[str, Any] = captured.assert_tracked("Signup", user_id=7, properties={"plan": "pro"})
    captured.assert_identified(7, traits={"plan": "pro"}, count=1)
    captured.assert_not_tracked("Refund")
    check(event["userId"] == "7" and len(captured) == 2, "klime.testing")
    klime.client = None


def main() -> int:
    with Collector(write_key=WRITE_KEY) as collector:
        client_api(collector.url)
        transports_and_senders()
        module_level(collector.url)
        asyncio.run(async_api(collector.url))
        collector.respond(Fault.status_code(500))  # one transient failure, retried
        with klime.Client(WRITE_KEY, endpoint=collector.url, retry_initial_delay=10) as retried:
            check(retried.track_sync("After Retry", user_id="u1").accepted == 1, "retried")
        testing_helpers()
        check(callable(asgi_app()), "asgi_lifespan")
        check(callable(lambda_handler) and callable(lambda_handler_with_options), "klime_lambda")
        check(callable(cloud_function), "klime_cloud_function")
        ids = collector.message_ids()
        check(len(ids) == len(set(ids)), "no duplicates")
        print(f"typed_usage: ok, {len(ids)} events reached the local collector")
    return 0


if __name__ == "__main__":
    sys.exit(main())
