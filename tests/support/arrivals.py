"""What reached the local collector, by tag: for tests that compare arrival times."""

from __future__ import annotations

from typing import Any, List, Tuple


def arrivals(collector: Any, tag: str) -> List[Tuple[str, float]]:
    """(messageId, received_at) of every accepted event whose ``properties.tag`` is ``tag``."""
    found = []
    for request in collector.requests():
        if request.status != 200:
            continue
        for event in request.json()["batch"]:
            if event.get("properties", {}).get("tag") == tag:
                found.append((event["messageId"], request.received_at))
    return found
