"""Senders decide WHERE events go: one call turns one batch into one delivery attempt chain.

A sender never knows about threads or queues (that is a transport's job) and never counts
events (that is :class:`klime._delivery.Delivery`'s job). Write your own by subclassing
:class:`Sender`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._batching import batch_body
from .base import Sender, SendResult

if TYPE_CHECKING:  # resolved lazily at run time (requests / boto3 only when used)
    from .http import HttpSender
    from .sqs import SqsSender

__all__ = ["Sender", "SendResult", "HttpSender", "SqsSender", "batch_body"]


def __getattr__(name: str) -> object:  # lazy: requests / boto3 are imported only when used
    if name == "HttpSender":
        from .http import HttpSender

        return HttpSender
    if name == "SqsSender":
        from .sqs import SqsSender

        return SqsSender
    raise AttributeError(name)
