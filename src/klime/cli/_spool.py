"""``klime spool DIR``: show what a durable spool directory holds, send the events of the
processes that are gone (``--send``), or delete every spooled event (``--clear --yes``).

May import: the spool, the HTTP sender, the model (configuration, deadlines, errors) — the
heavy ones on first use — and the standard library.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, TextIO

from ..errors import ConfigurationError, SpoolUnavailable
from ..senders.base import split_too_large
from ._status import OK, SEND_FAILED, USAGE, fail

if TYPE_CHECKING:
    from ..senders.http import HttpSender
    from ..spool import Claimed, Spool, SpoolStats

__all__ = ["spool"]


#: C0 and C1 control characters, DEL, and the Unicode controls that reorder or hide text.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
#: Names klime keeps in a spool directory besides the database.
_KLIME_NAMES = ("open.lock", "owners")


def _safe(text: object) -> str:
    """``text`` for a terminal: every control character (escape sequences included) shown
    as ``\\xNN`` / ``\\uNNNN``, so nothing read from a spool or a server can drive the
    terminal."""

    def escape(match: re.Match[str]) -> str:
        code = ord(match.group())
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"

    return _CONTROLS.sub(escape, str(text))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    for unit, scale, sub, subscale in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= scale:
            return f"{s // scale}{unit} {(s % scale) // subscale}{sub}"
    return f"{s}s"  # pragma: no cover - unreachable


def _print_spool(stats: SpoolStats, out: TextIO) -> None:
    if not stats.count and not stats.owners:
        print(f"{stats.directory}: empty", file=out)
        return
    oldest = _age(stats.oldest_age)
    print(f"{stats.directory}: {stats.count:,} events, {_size(stats.bytes)}, oldest {oldest} ago", file=out)
    print(
        f"  in flight: {stats.claimed:,}; waiting for a retry: {stats.waiting:,}; dropped by the byte cap "
        f"so far: {stats.dropped_count:,} ({_size(stats.dropped_bytes)})",
        file=out,
    )
    print(f"  owners: {stats.alive_owners} alive, {stats.dead_owners} dead", file=out)
    for o in stats.owners:
        where = f"pid {o.pid} on {_safe(o.host)}" if o.pid is not None else "unregistered"
        print(
            f"    {'alive' if o.alive else 'dead ':5}  {where:<28} {o.count:>9,} events  {_size(o.bytes):>10}"
            f"  oldest {_age(o.oldest_age)}",
            file=out,
        )
    if stats.dead_owners:
        print("  (events of dead owners are adopted by the app's next live process, or by --send)", file=out)


def _describe(raw: bytes) -> str:
    try:
        event = json.loads(raw)
        name = f' "{_safe(event["event"])}"' if event.get("event") else ""
        return f"{_safe(event.get('messageId', '?'))}  {_safe(event.get('type', '?'))}{name}"
    except (ValueError, TypeError, AttributeError, RecursionError):
        return f"<{len(raw)} bytes that are not a JSON event>"


class _Drain:
    """One ``klime spool DIR --send`` run: what happened to every event it claimed."""

    def __init__(self, spool: Spool, sender: HttpSender, deadline: Any) -> None:
        self.spool = spool
        self.sender = sender
        self.deadline = deadline
        self.sent = 0
        self.requests = 0
        self.rejected: List[Dict[str, Any]] = []
        self.stopped: Optional[str] = None

    def run(self) -> None:
        rounds = self.spool.stats().count + 1  # every round settles an event or stops
        for _ in range(rounds):
            if self.deadline.expired():
                self.stopped = "--timeout reached"
                return
            batch = self.spool.claim(
                self.sender.max_batch_events, self.sender.max_batch_bytes, include_waiting=True
            )
            if not batch or not self.send(batch):
                return

    def send(self, batch: Claimed) -> bool:
        """Send and settle ``batch``; False when the run must stop (the batch is released)."""
        try:
            result = self.sender.send(batch.events, self.deadline)
        except Exception as exc:  # an outcome nobody can vouch for: keep the events
            self.spool.release(batch, retry_at=time.time())
            self.stopped = f"the sender failed ({type(exc).__name__}); the events were kept"
            return False
        self.requests += result.requests
        error = result.error
        if error is None:
            self.sent += self.spool.ack(batch)
            return True
        status = error.status_code
        halves = split_too_large(result, range(len(batch)))
        if halves is not None:
            first, second = batch.split(halves[0])
            if not self.send(first):
                self.spool.release(second, retry_at=time.time())
                return False
            return self.send(second)
        if result.response is not None:  # a partial failure: some accepted, some rejected
            failed, accepted = batch.split(result.failed)
            self.sent += self.spool.ack(accepted)
            messages = {e.index: e.message for e in result.response.errors}
            reasons = [messages.get(i, error.message) for i in result.failed]
            self._reject(failed, status, reasons)
            return True
        permanent = status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429)
        if permanent:
            self._reject(batch, status, [error.message] * len(batch))
            return True
        # transient, or a refused write key / unusable endpoint: keep the events, stop here
        self.spool.release(batch, retry_at=time.time())
        self.stopped = error.message if status not in (401, 403) else f"{error.message} (check the write key)"
        return False

    def _reject(self, batch: Claimed, status: Optional[int], reasons: List[str]) -> None:
        self.spool.reject(batch)
        for raw, reason in zip(batch.events, reasons):
            self.rejected.append({"event": _describe(raw), "status_code": status, "error": reason})


def _print_drain(drain: _Drain, left: int, held: int, live_pids: List[Any], others: int) -> None:
    plural = "" if drain.requests == 1 else "s"
    print(f"sent {drain.sent:,} events in {drain.requests:,} request{plural}", file=sys.stdout)
    if drain.rejected:
        print(f"rejected {len(drain.rejected):,} events (deleted from the spool):", file=sys.stdout)
        for r in drain.rejected:
            code = f"HTTP {r['status_code']}" if r["status_code"] is not None else "error"
            print(f"  {r['event']}  ({code}: {_safe(r['error'])})", file=sys.stdout)
    if left:
        print(f"left {left:,} events in the spool: {_safe(drain.stopped)}", file=sys.stdout)
    if held:
        pids = ", ".join(str(pid) for pid in live_pids)
        print(f"{held:,} events belong to live processes (pid {pids}) and were left to them")
    if others:
        print(
            f"{others:,} events belong to another project (another endpoint or write key) and were left to it"
        )


def _spool_send(args: argparse.Namespace, directory: str) -> int:
    from .._config import DEFAULT_ENDPOINT, ENV_ENDPOINT, ENV_WRITE_KEY, env
    from .._deadline import Deadline
    from ..senders.http import HttpSender
    from ..spool import Spool, project_id

    write_key = args.write_key or env(ENV_WRITE_KEY)
    if not write_key:
        return fail(f"a write key is needed: --write-key or ${ENV_WRITE_KEY}", USAGE)
    endpoint = args.endpoint or env(ENV_ENDPOINT) or DEFAULT_ENDPOINT
    try:
        sender = HttpSender(write_key, endpoint)
    except ConfigurationError as exc:
        return fail(exc, USAGE)
    try:
        # this key's project, and rows of a klime from before projects: the operator named
        # the directory and the key, so those are theirs to send (docs/spool.md, Security)
        spool = Spool.open(directory, project=project_id(endpoint, write_key), adopt_legacy=True)
    except SpoolUnavailable as exc:
        sender.close()
        return fail(exc, SEND_FAILED)
    try:
        adopted = spool.adopt()
        drain = _Drain(spool, sender, Deadline.after(args.timeout))
        drain.run()
        stats = spool.stats()
    except SpoolUnavailable as exc:
        return fail(exc, SEND_FAILED)
    finally:
        spool.close()
        sender.close()
    mine = [o for o in stats.owners if o.current]
    left = mine[0].count if mine else 0
    live = [o for o in stats.owners if o.alive and not o.current]
    held = sum(o.count for o in live)
    others = sum(o.count for o in stats.owners if not o.alive and not o.current)
    if args.json:
        report = {
            "adopted": adopted,
            "sent": drain.sent,
            "requests": drain.requests,
            "rejected": drain.rejected,
            "left": left,
            "stopped": drain.stopped,
            "held_by_live_processes": held,
            "live_pids": [o.pid for o in live],
            "left_to_other_projects": others,
        }
        print(json.dumps(report, sort_keys=True))
    else:
        _print_drain(drain, left, held, [o.pid for o in live], others)
    return OK if not drain.rejected and not left else SEND_FAILED


def _not_a_spool(directory: str, *, sending: bool) -> Optional[str]:
    """Why ``directory`` must be left alone, or None for a klime spool (an empty directory
    is an empty spool, except to send from). Creates and changes nothing."""
    from ..spool import _safety, _store

    try:
        _safety.check_directory(directory, fix=False)
        kind = _store.recognise(directory)
        names = os.listdir(directory)
    except SpoolUnavailable as exc:
        return _safe(exc)
    except OSError as exc:
        return _safe(f"klime spool {directory}: cannot read it ({exc.strerror})")
    if kind in ("klime", "legacy"):
        return None
    not_klime = f"{directory} is not a klime spool: its {_store.DB_NAME}"
    if kind == "corrupt":
        return _safe(f"{not_klime} is not an SQLite database (corrupt?)")
    if kind == "foreign":
        return _safe(f"{not_klime} is another program's database")
    if any(not (name in _KLIME_NAMES or name.startswith(_store.DB_NAME)) for name in names):
        return _safe(f"{directory} is not a klime spool (no {_store.DB_NAME}, and other files in it)")
    if sending:
        return _safe(f"{directory} holds no klime spool yet (no {_store.DB_NAME}): nothing to send")
    return None


def spool(args: argparse.Namespace) -> int:
    """Run ``klime spool`` as ``args`` say; blocks (``--send``: up to ``--timeout``).
    Returns the exit status: 0 done, 1 events rejected or left or the spool unusable,
    2 bad usage or no such directory."""
    from ..spool import clear, inspect

    directory = os.path.abspath(args.directory)
    if args.yes and not args.clear:
        return fail("--yes goes with --clear", USAGE)
    if not os.path.isdir(directory):
        return fail(f"no spool directory at {directory}", USAGE)
    refusal = _not_a_spool(directory, sending=bool(args.send))
    if refusal is not None:
        return fail(refusal, SEND_FAILED)
    try:
        if args.send:
            return _spool_send(args, directory)
        stats = inspect(directory)
        if args.clear:
            if not args.yes:
                return fail(
                    f"--clear deletes {stats.count:,} events ({_size(stats.bytes)}) from {directory}; "
                    "add --yes to do it",
                    USAGE,
                )
            count, nbytes = clear(directory)
            if args.json:
                print(json.dumps({"cleared": count, "bytes": nbytes}), file=sys.stdout)
            else:
                print(f"cleared {count:,} events ({_size(nbytes)}) from {directory}", file=sys.stdout)
            return OK
    except SpoolUnavailable as exc:
        return fail(exc, SEND_FAILED)
    if args.json:
        print(json.dumps(stats.to_dict(), sort_keys=True), file=sys.stdout)
    else:
        _print_spool(stats, sys.stdout)
    return OK
