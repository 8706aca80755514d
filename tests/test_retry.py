"""klime._retry: the one backoff formula, the retry policy and the batch's retry value."""

from __future__ import annotations

import dataclasses

import pytest

from klime._retry import FIRST_TRY, Retry, RetryPolicy, backoff_delay


def test_backoff_doubles_from_the_initial_delay_up_to_the_cap():
    assert [backoff_delay(n, 1.0, 16.0) for n in range(1, 8)] == [1, 2, 4, 8, 16, 16, 16]
    assert backoff_delay(0, 1.0, 16.0) == 1.0  # no failure yet reads as the first
    assert backoff_delay(10_000, 0.5, 30.0) == 30.0  # no overflow, however many failures
    assert backoff_delay(3, -1.0, 10.0) == 0.0  # never negative


def test_a_retry_value_is_frozen_and_each_attempt_makes_a_new_one():
    first = FIRST_TRY
    second = first.attempted(retry_after=2.0)
    assert first == Retry() and first.attempts == 0
    assert second.attempts == 1 and second.retry_after == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.attempts = 5  # type: ignore[misc]
    third = second.attempted(stale=True)
    assert third.attempts == 2 and third.retry_after is None and third.stale_retry_used
    assert third.backoff_steps == 1  # the at-once retry after a stale connection is no backoff step


def test_the_policy_waits_for_retry_after_first_then_backs_off():
    policy = RetryPolicy(3, 0.5, jitter=0)
    assert policy.wait(Retry(1, retry_after=7.0)) == 7.0
    assert policy.wait(Retry(1)) == 0.5 and policy.wait(Retry(2)) == 1.0
    assert policy.wait(Retry(2, stale_retry_used=True)) == 0.5
    assert not policy.exhausted(Retry(2)) and policy.exhausted(Retry(3))
