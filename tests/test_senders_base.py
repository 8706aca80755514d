"""klime.senders.base: the one retry loop (send_with_retries) over one-attempt senders, the
adaptation of a user's send-only sender, and the one 413 rule."""

from __future__ import annotations

from typing import Callable, List, Sequence

from klime._deadline import Deadline
from klime._models import BatchResponse
from klime._retry import Retry, RetryPolicy
from klime.errors import SendError
from klime.senders.base import (
    ATTEMPT_OK,
    ATTEMPT_REJECTED,
    ATTEMPT_TRANSIENT,
    OK,
    REFUSED,
    RETRY,
    TOO_LARGE,
    Attempt,
    Sender,
    SendResult,
    send_with_retries,
    split_too_large,
)


class Scripted(Sender):
    """A one-attempt sender in memory (in the manner of httpx's MockTransport): each
    :meth:`attempt` returns the next scripted outcome and records the call."""

    def __init__(self, *outcomes: Attempt, attempts: int = 3) -> None:
        self.outcomes = list(outcomes)
        self.calls: List[int] = []
        self.retry_policy = RetryPolicy(attempts, 0.0, jitter=0)

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        return send_with_retries(self, events, deadline)

    def attempt(self, events: Sequence[bytes], deadline: Deadline) -> Attempt:
        self.calls.append(len(events))
        return self.outcomes.pop(0)


def listening(heard: List[str], answer: bool = True) -> Callable[[str, float, float], bool]:
    """A pace hook that records each outcome and answers ``answer``."""

    def pace(outcome: str, seconds: float, cpu: float) -> bool:
        heard.append(outcome)
        return answer

    return pace


def ok(n: int) -> Attempt:
    return Attempt(OK, 200, BatchResponse("ok", n, 0, (), 200))


def test_transient_failures_are_retried_until_one_is_accepted():
    sender = Scripted(Attempt(RETRY, 503, reason="HTTP 503"), Attempt(RETRY, reason="reset"), ok(2))
    heard: List[str] = []
    result = send_with_retries(sender, [b"a", b"b"], Deadline.after(5), pace=listening(heard))
    assert result.error is None and result.requests == 3 and result.retries == 2
    assert result.retry.attempts == 3
    assert heard == [ATTEMPT_TRANSIENT, ATTEMPT_TRANSIENT, ATTEMPT_OK]


def test_attempts_run_out_with_a_retryable_error():
    sender = Scripted(*[Attempt(RETRY, 500, reason="HTTP 500")] * 3)
    result = send_with_retries(sender, [b"a"], Deadline.after(5))
    assert result.error is not None and result.error.retryable and result.failed == (0,)
    assert "gave up after 3 attempts: HTTP 500" in result.error.message and len(sender.calls) == 3


def test_earlier_attempts_of_a_deferred_batch_count_against_the_limit():
    sender = Scripted(*[Attempt(RETRY, 500, reason="HTTP 500")] * 3)
    result = send_with_retries(sender, [b"a"], Deadline.after(5), retry=Retry(2))
    assert len(sender.calls) == 1 and result.requests == 1 and result.retries == 1
    assert result.retry.attempts == 3 and not result.deferred


def test_pace_defers_a_transiently_failing_batch_without_retrying_it():
    sender = Scripted(Attempt(RETRY, 429, reason="HTTP 429"), ok(1))
    result = send_with_retries(sender, [b"a"], Deadline.after(5), pace=lambda o, s, c: o != ATTEMPT_TRANSIENT)
    assert result.deferred and len(sender.calls) == 1 and result.retry.attempts == 1
    assert result.error is not None and result.error.status_code == 429


def test_a_stale_connection_is_retried_at_once_and_unheard_by_pace():
    sender = Scripted(Attempt(RETRY, reason="reset", stale=True), ok(1))
    heard: List[str] = []
    result = send_with_retries(sender, [b"a"], Deadline.after(5), pace=listening(heard, False))
    assert result.error is None and heard == [ATTEMPT_OK] and result.retry.stale_retry_used


def test_retry_after_past_the_deadline_ends_the_call_at_once():
    sender = Scripted(Attempt(RETRY, 429, reason="HTTP 429", retry_after=30.0), ok(1))
    result = send_with_retries(sender, [b"a"], Deadline.after(0.5))
    assert result.deadline_reached and len(sender.calls) == 1


def test_refusals_are_final_and_heard_as_rejected():
    refused = Attempt(REFUSED, 400, error=SendError("batch rejected: HTTP 400", 400), failed=(0,))
    sender = Scripted(refused)
    heard: List[str] = []
    result = send_with_retries(sender, [b"a"], Deadline.after(5), pace=listening(heard))
    assert result.error is not None and result.error.status_code == 400 and heard == [ATTEMPT_REJECTED]


class SendOnly(Sender):
    """A user's sender as docs/transports.md shows it: only ``send``."""

    def __init__(self) -> None:
        self.calls = 0

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        self.calls += 1
        return SendResult(None, SendError("down", None, retryable=True), tuple(range(len(events))), 1)


def test_a_send_only_sender_is_one_attempt_whose_result_is_final():
    sender = SendOnly()
    heard: List[str] = []
    result = send_with_retries(sender, [b"a", b"b"], Deadline.after(5), pace=listening(heard, False))
    assert sender.calls == 1 and not result.deferred and result.error is not None and result.error.retryable
    assert heard == [ATTEMPT_TRANSIENT] and result.retry.attempts == 1
    assert sender.attempt([b"a"], Deadline.after(5)).kind == REFUSED  # its one attempt, final


def test_a_batch_refused_for_its_size_is_halved_once_down_to_single_events():
    too_large = SendResult(None, SendError("413", 413), (0, 1, 2), 1, too_large=True)
    assert split_too_large(too_large, [1, 2, 3]) == ([1], [2, 3])
    assert split_too_large(too_large, [1]) is None
    assert split_too_large(SendResult(None, SendError("400", 400), (0,), 1), [1, 2]) is None
    sender = Scripted(Attempt(TOO_LARGE, 413, error=SendError("too large", 413), failed=(0, 1)))
    assert send_with_retries(sender, [b"a", b"b"], Deadline.after(5)).too_large
