"""The example's own tests (``pytest`` in this directory): run the task functions directly;
``klime_events`` records what they track, nothing is sent and no worker is needed."""

from __future__ import annotations

from typing import Any

from tasks import invoice_paid, signup


def test_signup_tracks(klime_events: Any) -> None:
    signup("u1", "pro")

    klime_events.assert_identified("u1", traits={"plan": "pro"})
    klime_events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"}, count=1)


def test_invoice_paid_is_sent_before_the_task_ends(klime_events: Any) -> None:
    invoice_paid.apply(args=("u2", 120)).get()  # runs the task here, as a worker would

    klime_events.assert_tracked("Invoice Paid", user_id="u2", properties={"amount": 120})
