"""Packing Klime events into SQS messages and SendMessageBatch calls, within SQS's limits.

A message body is one Klime request body, ``{"batch":[event, ...]}``, at most
``events_per_message`` events and ``max_message_bytes`` bytes (256 KiB by default); a
``SendMessageBatch`` call carries at most 10 entries and 1 MiB of bodies. A FIFO message
gets a MessageDeduplicationId derived from its events' messageIds, so a retried message is
never enqueued twice. Pure functions and plain data: no boto3, no I/O, no threads.

Its public names are re-exported by :mod:`klime.senders.sqs` (and listed in its
``__all__``). Imports: :mod:`klime._batching` (the split by count and bytes) and
:mod:`klime._events` (reading a messageId); nothing AWS.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._batching import batch_body, split_batches
from .._events import message_id

#: SQS's own limits (2025 onward): a message and a whole SendMessageBatch call both carry at
#: most 1 MiB of message bodies; a call holds at most 10 entries.
SQS_MAX_MESSAGE_BYTES = 1_048_576
SQS_MAX_BATCH_BYTES = 1_048_576
SQS_MAX_BATCH_ENTRIES = 10
#: The smallest MaximumMessageSize a queue can have.
SQS_MIN_MESSAGE_BYTES = 1024

#: klime's default message size: 256 KiB fits every queue, including those created before
#: SQS raised its limit to 1 MiB (their MaximumMessageSize stays 256 KiB), and SQS bills
#: per 64 KiB of payload anyway, so larger messages save nothing.
DEFAULT_MAX_MESSAGE_BYTES = 262_144


class Message:
    """One SQS message to send: events ``[start, end)`` of the batch, its body and dedup id."""

    __slots__ = ("body", "dedup_id", "end", "start")

    def __init__(self, start: int, end: int, body: bytes, dedup_id: Optional[str]) -> None:
        self.start = start
        self.end = end
        self.body = body
        self.dedup_id = dedup_id


def sqs_safe(event: bytes) -> bytes:
    """``event`` with the characters SQS refuses in a message escaped.

    SQS accepts only the XML character range; klime's JSON (``ensure_ascii=False``) escapes
    control characters already, which leaves U+FFFE and U+FFFF. Both can only sit inside a
    JSON string, where ``\\ufffe`` / ``\\uffff`` mean the same. Pure; thread-safe.
    """
    if b"\xef\xbf" not in event:
        return event
    return event.replace(b"\xef\xbf\xbe", b"\\ufffe").replace(b"\xef\xbf\xbf", b"\\uffff")


def plan_messages(events: Sequence[bytes], max_events: int, max_bytes: int) -> List[Tuple[int, int]]:
    """Cut ``events`` into messages, returned as consecutive ``(start, end)`` index ranges.

    The cut is :func:`klime._batching.split_batches`'s: no message holds more than
    ``max_events`` events or a body (``{"batch":[...]}``) over ``max_bytes``, except an
    event too large for any message, which gets one of its own. Pure; thread-safe.
    """
    ranges: List[Tuple[int, int]] = []
    start = 0
    for batch in split_batches(events, max_events, max_bytes):
        ranges.append((start, start + len(batch)))
        start += len(batch)
    return ranges


def plan_calls(body_sizes: Sequence[int], max_entries: int, max_bytes: int) -> List[List[int]]:
    """Pack messages (by body size) into SendMessageBatch calls, keeping order.

    Returns lists of message indices: no call has more than ``max_entries`` messages or
    bodies adding up to more than ``max_bytes`` (a message larger than that alone gets a
    call of its own). Pure; thread-safe.
    """
    calls: List[List[int]] = []
    current: List[int] = []
    total = 0
    for i, n in enumerate(body_sizes):
        if current and (len(current) >= max_entries or total + n > max_bytes):
            calls.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current:
        calls.append(current)
    return calls


def pack(events: Sequence[bytes], max_events: int, max_bytes: int, *, fifo: bool) -> List[Message]:
    """The messages for ``events`` (encoded Klime events), in order; FIFO ones with a dedup id.

    A message may still exceed ``max_bytes`` when one event alone does: the caller refuses
    it. Pure; thread-safe.
    """
    safe = [sqs_safe(e) for e in events]
    messages = []
    for start, end in plan_messages(safe, max_events, max_bytes):
        body = batch_body(safe[start:end])
        dedup = _dedup_id(events[start:end], body) if fifo else None
        messages.append(Message(start, end, body, dedup))
    return messages


def entry(index: int, message: Message, group_id: Optional[str]) -> Dict[str, Any]:
    """The SendMessageBatch entry of ``message`` (``group_id`` given for a FIFO queue only)."""
    item: Dict[str, Any] = {"Id": str(index), "MessageBody": message.body.decode("utf-8")}
    if group_id is not None:
        item["MessageGroupId"] = group_id
        item["MessageDeduplicationId"] = message.dedup_id
    return item


def _dedup_id(events: Sequence[bytes], body: bytes) -> str:
    """A FIFO MessageDeduplicationId: the SHA-256 of the events' messageIds (of the body for
    events klime did not encode), so the same events always get the same id."""
    try:
        text = "\n".join(message_id(e) for e in events).encode("ascii")
    except (ValueError, UnicodeDecodeError):
        text = body
    return hashlib.sha256(text).hexdigest()
