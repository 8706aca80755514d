"""Values the spool hands out: a claimed batch, an append's outcome, statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

from .._batching import body_size

__all__ = ["Claimed", "AppendResult", "AdoptResult", "OwnerStats", "SpoolStats"]


@dataclass(frozen=True)
class Claimed:
    """A batch of spooled events claimed by one owner: send ``events``, then settle the batch
    with exactly one of ``ack``/``release``/``reject`` (or split it first).

    ``ids`` are the rows (in the order of ``events``); ``attempts`` how many times each
    was released after a failed attempt; ``created`` the unix time each was appended.
    Immutable, so safe to pass between threads. Its repr shows counts, never event data.
    """

    owner: str
    ids: Tuple[int, ...] = ()
    events: Tuple[bytes, ...] = field(default=(), repr=False)
    attempts: Tuple[int, ...] = field(default=(), repr=False)
    created: Tuple[float, ...] = field(default=(), repr=False)

    def __len__(self) -> int:
        return len(self.ids)

    def __bool__(self) -> bool:
        return bool(self.ids)

    def __repr__(self) -> str:
        return f"Claimed(<{len(self.ids)} events, {self.nbytes} bytes>)"

    @property
    def nbytes(self) -> int:
        """The events' bytes (not counting the request body around them)."""
        return sum(map(len, self.events))

    @property
    def body_size(self) -> int:
        """The size of the request body ``{"batch":[...]}`` of these events."""
        return body_size(self.events)

    @property
    def max_attempts(self) -> int:
        """The most attempts any of these events has had (0 for fresh ones)."""
        return max(self.attempts, default=0)

    def split(self, indices: Sequence[int]) -> Tuple[Claimed, Claimed]:
        """``(the events at indices, the others)``, each a Claimed of the same owner, order kept.
        E.g. after a partial failure: ``rejected, accepted = claimed.split(result.failed)``."""
        chosen = set(indices)
        parts: Tuple[list[int], list[int]] = ([], [])
        for i in range(len(self.ids)):
            parts[0 if i in chosen else 1].append(i)
        return self._pick(parts[0]), self._pick(parts[1])

    def _pick(self, positions: Sequence[int]) -> Claimed:
        return Claimed(
            self.owner,
            tuple(self.ids[i] for i in positions),
            tuple(self.events[i] for i in positions),
            tuple(self.attempts[i] for i in positions),
            tuple(self.created[i] for i in positions),
        )


@dataclass(frozen=True)
class AppendResult:
    """What one :meth:`~klime.spool.Spool.append` did.

    ``appended``: events of this call written to the spool (an event larger than the whole
    byte cap is not written; it is in ``dropped``). ``dropped``: events the byte cap removed
    in this call, oldest first — unclaimed rows of this owner, possibly events of this very
    call — for the caller to report (e.g. to ``on_error``); they are gone from the spool.
    """

    appended: int
    dropped: Tuple[bytes, ...] = field(default=(), repr=False)

    @property
    def dropped_count(self) -> int:
        return len(self.dropped)

    @property
    def dropped_bytes(self) -> int:
        return sum(map(len, self.dropped))

    def __repr__(self) -> str:
        return f"AppendResult(appended={self.appended}, dropped=<{self.dropped_count} events>)"


@dataclass(frozen=True)
class OwnerStats:
    """One owner of a spool: a process (or a spool it opened) that holds rows or is alive.

    ``current`` is True for the owner of the spool object that made the snapshot. ``pid``,
    ``host`` and ``opened`` (unix time) are None for rows whose owner was never registered.
    ``project``: the fingerprint of the endpoint and write key the owner sends to
    (:func:`klime.spool.project_id`); None for an owner registered by an older klime, or
    never registered. Only an owner of the same project adopts another's rows.
    """

    token: str
    pid: Optional[int]
    host: Optional[str]
    opened: Optional[float]
    alive: bool
    current: bool
    count: int
    bytes: int
    claimed: int
    waiting: int
    oldest_age: Optional[float]
    project: Optional[str] = None


@dataclass(frozen=True)
class AdoptResult:
    """What one :meth:`~klime.spool.Spool.adopt_events` did: ``adopted`` rows of gone owners
    of this project became this owner's; ``invalid`` rows of theirs that were not klime
    events (see :func:`klime.spool.valid_event`) were deleted instead, never to be sent:
    here for the caller to count and report (their bytes, or a placeholder object naming
    the size when they are not a JSON object)."""

    adopted: int
    invalid: Tuple[bytes, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        return f"AdoptResult(adopted={self.adopted}, invalid=<{len(self.invalid)} rows>)"


@dataclass(frozen=True)
class SpoolStats:
    """A snapshot of a whole spool (every owner's rows).

    ``count``/``bytes``: rows and their event bytes; ``claimed``: rows in flight (claimed and
    not yet settled); ``waiting``: unclaimed rows whose next attempt is in the future (released
    after a failure); ``oldest_age``: seconds since the oldest row was appended (None when
    empty); ``dropped_count``/``dropped_bytes``: removed by the byte cap since the spool was
    created (all processes); ``max_bytes``: this spool object's cap (None from ``inspect``).
    """

    directory: str
    count: int
    bytes: int
    claimed: int
    waiting: int
    oldest_age: Optional[float]
    dropped_count: int
    dropped_bytes: int
    max_bytes: Optional[int]
    owners: Tuple[OwnerStats, ...]

    @property
    def alive_owners(self) -> int:
        return sum(1 for o in self.owners if o.alive)

    @property
    def dead_owners(self) -> int:
        return sum(1 for o in self.owners if not o.alive)

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (JSON-serialisable)."""
        return asdict(self)
