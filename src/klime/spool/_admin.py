"""Looking at a spool and emptying it: :func:`inspect`, :func:`clear` (used by ``klime spool``)."""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import SpoolUnavailable
from . import _owners
from ._models import OwnerStats, SpoolStats
from ._store import begin, connect_existing, has_projects, unavailable

__all__ = ["inspect", "clear", "read_stats", "registered_owners"]


def registered_owners(
    conn: sqlite3.Connection,
) -> Dict[int, Tuple[str, _owners.Identity, float, Optional[str]]]:
    """owner id -> (token, identity, opened, project); the project is None for an owner
    registered by a klime from before projects (schema 1)."""
    project = "project" if has_projects(conn) else "NULL"
    rows = conn.execute(
        f"SELECT id, token, pid, start_ticks, boot_id, pid_ns, host, opened, {project} FROM owners"
    )
    return {
        row[0]: (row[1], _owners.Identity(row[2], row[3], row[4], row[5], row[6]), row[7], row[8])
        for row in rows.fetchall()
    }


def read_stats(
    conn: sqlite3.Connection,
    directory: str,
    *,
    current: Optional[int],
    now: float,
    max_bytes: Optional[int],
) -> SpoolStats:
    """One pass over the rows (O(rows)) plus a non-blocking lock probe per other owner."""
    owners_dir = os.path.join(directory, _owners.OWNERS_DIR)
    count, nbytes, dropped_count, dropped_bytes = conn.execute(
        "SELECT count, bytes, dropped_count, dropped_bytes FROM totals"
    ).fetchone()
    per_owner = {
        row[0]: row[1:]
        for row in conn.execute(
            "SELECT owner, COUNT(*), SUM(size), SUM(claimed), SUM(claimed = 0 AND due > ?), MIN(created)"
            " FROM events GROUP BY owner",
            (now,),
        )
    }
    registered = registered_owners(conn)
    owners: List[OwnerStats] = []
    for owner_id in sorted(set(per_owner) | set(registered)):
        rows, size, claimed, waiting, oldest = per_owner.get(owner_id, (0, 0, 0, 0, None))
        unregistered = (f"unregistered-{owner_id}", None, None, None)
        token, ident, opened, project = registered.get(owner_id, unregistered)
        is_current = owner_id == current
        owners.append(
            OwnerStats(
                token=token,
                pid=ident.pid if ident else None,
                host=ident.host if ident else None,
                opened=opened,
                alive=is_current or (ident is not None and _owners.is_alive(owners_dir, token, ident)),
                current=is_current,
                count=rows,
                bytes=size or 0,
                claimed=claimed or 0,
                waiting=waiting or 0,
                oldest_age=None if oldest is None else max(0.0, now - oldest),
                project=project,
            )
        )
    first = [v[4] for v in per_owner.values() if v[4] is not None]
    return SpoolStats(
        directory=directory,
        count=count,
        bytes=nbytes,
        claimed=sum(o.claimed for o in owners),
        waiting=sum(o.waiting for o in owners),
        oldest_age=max(0.0, now - min(first)) if first else None,
        dropped_count=dropped_count,
        dropped_bytes=dropped_bytes,
        max_bytes=max_bytes,
        owners=tuple(owners),
    )


def _empty(directory: str) -> SpoolStats:
    return SpoolStats(directory, 0, 0, 0, 0, None, 0, 0, None, ())


def inspect(directory: str, *, clock: Callable[[], float] = time.time) -> SpoolStats:
    """Statistics of the spool in ``directory`` without joining it (no owner is registered,
    nothing is created, no row changes hands). A directory without a spool gives an empty
    snapshot. Blocks for one read of the database (O(rows)) and at most the busy timeout
    (2 s) if it is locked. Thread-safe. Raises SpoolUnavailable (``"missing"`` when the
    directory does not exist)."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise SpoolUnavailable(f"klime spool {directory}: no such directory", "missing", directory)
    conn = connect_existing(directory)
    if conn is None:
        return _empty(directory)
    try:
        return read_stats(conn, directory, current=None, now=clock(), max_bytes=None)
    except sqlite3.Error as exc:
        raise unavailable(exc, directory, "reading the spool") from exc
    finally:
        conn.close()


def clear(directory: str) -> Tuple[int, int]:
    """Delete every spooled event of every owner, live ones included (their batches in
    flight still finish; settling them then changes nothing). Returns ``(events, bytes)``
    deleted. One transaction; blocks up to the busy timeout (2 s) if the database is locked,
    then for the delete (O(rows)). Thread-safe. Raises SpoolUnavailable."""
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise SpoolUnavailable(f"klime spool {directory}: no such directory", "missing", directory)
    conn = connect_existing(directory)
    if conn is None:
        return 0, 0
    try:
        with begin(conn):
            count, nbytes = conn.execute("SELECT count, bytes FROM totals").fetchone()
            conn.execute("DELETE FROM events")
            conn.execute("UPDATE totals SET count = 0, bytes = 0")
        conn.executescript("PRAGMA incremental_vacuum;")  # give every free page back to the file system
        return count, nbytes
    except sqlite3.Error as exc:
        raise unavailable(exc, directory, "clearing the spool") from exc
    finally:
        conn.close()
