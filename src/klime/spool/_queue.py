"""The queue's SQL: each function is one operation on one connection, in one transaction
(or one per chunk), with the ``totals`` row kept exact. No locking, no error mapping, no
process logic: :class:`~klime.spool.Spool` supplies those. Blocks for its SQLite work."""

from __future__ import annotations

import sqlite3
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

from .._batching import BODY_OVERHEAD
from . import _owners
from ._admin import registered_owners
from ._models import Claimed
from ._safety import DEFAULT_PROJECT
from ._store import begin

__all__ = [
    "Owner",
    "register",
    "unregister_if_empty",
    "append",
    "claim",
    "delete",
    "release",
    "adopt",
    "legacy_rows",
    "compact",
]

#: Rows moved per transaction by :func:`adopt` (keeps the write lock short).
ADOPT_CHUNK = 2000


def _marks(n: int) -> str:
    return ",".join("?" * n)


class Owner(NamedTuple):
    """An owner as the database knows it: its token (lock file), its id (rows) and the
    project it sends to (whose gone owners' rows it may adopt)."""

    token: str
    id: int
    project: str


def register(conn: sqlite3.Connection, token: str, me: _owners.Identity, now: float, project: str) -> Owner:
    with begin(conn):
        cursor = conn.execute(
            "INSERT INTO owners (token, pid, start_ticks, boot_id, pid_ns, host, opened, project)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (token, me.pid, me.start, me.boot, me.pidns, me.host, now, project),
        )
    assert cursor.lastrowid is not None
    return Owner(token, cursor.lastrowid, project)


def unregister_if_empty(conn: sqlite3.Connection, owner: Owner) -> bool:
    """Forget ``owner`` if it has no rows left; True when it was forgotten."""
    with begin(conn):
        if conn.execute("SELECT 1 FROM events WHERE owner = ? LIMIT 1", (owner.id,)).fetchone() is not None:
            return False
        conn.execute("DELETE FROM owners WHERE id = ?", (owner.id,))
    return True


def append(
    conn: sqlite3.Connection,
    owner: Owner,
    now: float,
    keep: Sequence[bytes],
    too_big: Sequence[bytes],
    cap: int,
) -> List[bytes]:
    """Insert ``keep`` (due now), count ``too_big`` as dropped, then evict ``owner``'s
    oldest unclaimed rows (those just inserted included) until the spool's bytes are within
    ``cap``, or none of its own are left to evict. Returns what was dropped.

    Only the appender's own rows: a process never drops another live process's events, so
    each one's counters stay exact (what it tracked is sent, failed, dropped by itself or
    still spooled). Each append therefore leaves the spool no fuller than the cap or than it
    was before; a process whose own rows are all in flight waits for them."""
    dropped: List[bytes] = []
    with begin(conn):
        if keep:
            conn.executemany(
                "INSERT INTO events (owner, created, due, size, body) VALUES (?, ?, ?, ?, ?)",
                [(owner.id, now, now, len(b), b) for b in keep],
            )
            conn.execute(
                "UPDATE totals SET count = count + ?, bytes = bytes + ?", (len(keep), sum(map(len, keep)))
            )
        if too_big:
            conn.execute(
                "UPDATE totals SET dropped_count = dropped_count + ?, dropped_bytes = dropped_bytes + ?",
                (len(too_big), sum(map(len, too_big))),
            )
        (total,) = conn.execute("SELECT bytes FROM totals").fetchone()
        if total > cap:
            dropped = _evict(conn, owner, total - cap)
    return dropped + list(too_big)


def _evict(conn: sqlite3.Connection, owner: Owner, excess: int) -> List[bytes]:
    ids: List[int] = []
    bodies: List[bytes] = []
    freed = 0
    cursor = conn.execute(
        "SELECT id, body FROM events WHERE owner = ? AND claimed = 0 ORDER BY id", (owner.id,)
    )
    try:
        while freed < excess:  # bounded by the rows
            rows = cursor.fetchmany(64)
            if not rows:
                break
            for row_id, body in rows:
                ids.append(row_id)
                bodies.append(body)
                freed += len(body)
                if freed >= excess:
                    break
    finally:
        cursor.close()
    if ids:
        conn.executemany("DELETE FROM events WHERE id = ?", [(i,) for i in ids])
        conn.execute(
            "UPDATE totals SET count = count - ?, bytes = bytes - ?,"
            " dropped_count = dropped_count + ?, dropped_bytes = dropped_bytes + ?",
            (len(ids), freed, len(ids), freed),
        )
    return bodies


def claim(conn: sqlite3.Connection, owner: Owner, due_by: float, max_events: int, max_bytes: int) -> Claimed:
    with begin(conn):
        rows = conn.execute(
            "SELECT id, attempts, created, body FROM events"
            " WHERE owner = ? AND claimed = 0 AND due <= ? ORDER BY due, id LIMIT ?",
            (owner.id, due_by, max_events),
        ).fetchall()
        picked: List[Tuple[int, int, float, bytes]] = []
        size = BODY_OVERHEAD
        for row in rows:
            n = len(row[3]) + (1 if picked else 0)
            if picked and size + n > max_bytes:
                break
            size += n
            picked.append(row)
        ids = tuple(r[0] for r in picked)
        if ids:
            conn.execute(f"UPDATE events SET claimed = 1 WHERE id IN ({_marks(len(ids))})", ids)
    return Claimed(
        owner.token,
        ids,
        tuple(r[3] for r in picked),
        tuple(r[1] for r in picked),
        tuple(r[2] for r in picked),
    )


def _where(claimed: Claimed) -> str:
    return f" WHERE id IN ({_marks(len(claimed.ids))}) AND owner = ? AND claimed = 1"


def delete(conn: sqlite3.Connection, owner: Owner, claimed: Claimed) -> int:
    """Delete the rows of ``claimed`` still claimed by ``owner``; returns how many."""
    where = _where(claimed)
    params = (*claimed.ids, owner.id)
    with begin(conn):
        count, size = conn.execute(f"SELECT COUNT(*), TOTAL(size) FROM events{where}", params).fetchone()
        if count:
            conn.execute(f"DELETE FROM events{where}", params)
            conn.execute("UPDATE totals SET count = count - ?, bytes = bytes - ?", (count, int(size)))
    return int(count)


def release(conn: sqlite3.Connection, owner: Owner, claimed: Claimed, retry_at: float) -> int:
    """Unclaim the rows of ``claimed``, attempts + 1, due at ``retry_at``; returns how many."""
    with begin(conn):
        return conn.execute(
            "UPDATE events SET claimed = 0, attempts = attempts + 1, due = ?" + _where(claimed),
            (retry_at, *claimed.ids, owner.id),
        ).rowcount


def adopt(
    conn: sqlite3.Connection,
    owners_dir: str,
    me: Owner,
    *,
    orphans: bool,
    now: float,
    legacy: bool,
    valid: Callable[[object], bool],
) -> Tuple[int, List[object]]:
    """Move the rows of every dead owner *of this owner's project* to ``me``, due ``now`` at
    the latest (a backoff the dead process chose from its own view of the endpoint ends
    with it; the adopter backs off again if the endpoint still fails). ``legacy`` also
    takes the rows of dead owners that recorded no project (registered by an older klime,
    or of the default project) and,
    with ``orphans``, rows whose owner was never registered (O(rows)). Each row must pass
    ``valid``; one that does not is deleted (counted as dropped in the totals) and returned.
    Returns (rows moved, bodies of the invalid rows deleted).

    Safe against racing adopters: a dead owner's rows are moved while its lock is held (a
    second adopter's probe then fails and skips it), and each chunk is one transaction
    whose ``WHERE owner = dead`` no longer matches rows another adopter already took.
    """
    registered = registered_owners(conn)
    candidates: List[Tuple[int, Optional[str], Optional[_owners.Identity]]] = [
        (owner_id, token, ident)
        for owner_id, (token, ident, _, project) in registered.items()
        if owner_id != me.id and (project == me.project or (legacy and _unknown_project(project)))
    ]
    if orphans and legacy:
        query = "SELECT DISTINCT owner FROM events WHERE owner NOT IN (SELECT id FROM owners)"
        candidates += [(owner_id, None, None) for (owner_id,) in conn.execute(query).fetchall()]
    moved = 0
    invalid: List[object] = []
    for owner_id, token, ident in candidates:
        held = _owners.probe(owners_dir, token, ident) if token is not None else None
        if token is not None and held is None:
            continue  # alive (or cannot tell)
        done = False
        try:
            moved += _move(conn, owner_id, me.id, now, valid, invalid)
            done = True
        finally:
            if held is not None:
                held.finish(unlink=done)
    _owners.sweep(owners_dir, {entry[0] for entry in registered.values()} | {me.token})
    return moved, invalid


def _unknown_project(project: Optional[str]) -> bool:
    """No endpoint and key recorded: an older klime's owner, or one of the default project."""
    return project is None or project == DEFAULT_PROJECT


def legacy_rows(conn: sqlite3.Connection) -> int:
    """Rows of owners that recorded no project (an older klime's, the default project's) or
    were never registered. O(rows)."""
    (count,) = conn.execute(
        "SELECT COUNT(*) FROM events WHERE owner NOT IN"
        " (SELECT id FROM owners WHERE project IS NOT NULL AND project != ?)",
        (DEFAULT_PROJECT,),
    ).fetchone()
    return int(count)


def _move(
    conn: sqlite3.Connection,
    dead: int,
    to: int,
    now: float,
    valid: Callable[[object], bool],
    invalid: List[object],
) -> int:
    moved = 0
    while True:  # bounded: every round moves or deletes a chunk of a finite set, or ends
        with begin(conn):
            rows = conn.execute(
                "SELECT id, size, body FROM events WHERE owner = ? LIMIT ?", (dead, ADOPT_CHUNK)
            ).fetchall()
            good: List[Tuple[float, int]] = []
            bad_ids: List[Tuple[int]] = []
            bad_size = 0
            for row_id, size, body in rows:
                if valid(body):
                    good.append((now, row_id))
                else:
                    bad_ids.append((row_id,))
                    bad_size += size if isinstance(size, int) else 0
                    invalid.append(body)
            if good:
                conn.executemany(
                    f"UPDATE events SET owner = {int(to)}, claimed = 0, due = MIN(due, ?) WHERE id = ?", good
                )
            if bad_ids:
                conn.executemany("DELETE FROM events WHERE id = ?", bad_ids)
                conn.execute(
                    "UPDATE totals SET count = MAX(0, count - ?), bytes = MAX(0, bytes - ?),"
                    " dropped_count = dropped_count + ?, dropped_bytes = dropped_bytes + ?",
                    (len(bad_ids), bad_size, len(bad_ids), bad_size),
                )
            if len(rows) < ADOPT_CHUNK:
                conn.execute("DELETE FROM owners WHERE id = ?", (dead,))
        moved += len(good)
        if len(rows) < ADOPT_CHUNK:
            return moved


def compact(conn: sqlite3.Connection, max_pages: int, *, keep: int = 256) -> int:
    """Give up to ``max_pages`` free pages back to the file system (the file shrinks at the
    next checkpoint) when more than ``keep`` are free. Returns the pages freed."""
    free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    if free <= keep or max_pages < 1:
        return 0
    # executescript steps the pragma to the end; execute() would free one page only
    conn.executescript(f"PRAGMA incremental_vacuum({min(free, int(max_pages))});")
    return free - int(conn.execute("PRAGMA freelist_count").fetchone()[0])
