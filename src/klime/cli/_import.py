"""``klime import PATH...``: send history (NDJSON or CSV exports, ``.gz`` too) to Klime.

Reads each file line by line, sends every event with its own timestamp and a messageId
(its own, or a deterministic one), several batches in flight, and shows progress on
stderr: a line that updates itself on a terminal, a summary line every 10 s otherwise.
Malformed lines are printed as ``FILE:LINE: reason`` and skipped. Exit statuses:

- 0: every line was read and every event accepted (lines that cannot become a Klime
  event, such as page calls, are counted in the summary, not an error);
- 1: some events were not delivered: rejected by the server (kept in ``--rejects FILE``)
  or the server kept failing and the import stopped (run it again with the same
  ``--checkpoint`` to resume);
- 2: bad usage or configuration (no write key, unreadable file, unusable checkpoint);
- 3: everything that was read was sent, but some lines were malformed and skipped;
- 130: interrupted (the checkpoint is written: run again to resume).

May import: :mod:`klime._backfill` (on first use), the model and the standard library.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any, Optional, TextIO

from ..errors import ConfigurationError
from ._status import INTERRUPTED, OK, SEND_FAILED, USAGE, fail, printable

__all__ = ["MALFORMED", "add_import_command", "import_command"]

#: Exit status: everything read was sent, but malformed lines were skipped.
MALFORMED = 3
#: Malformed lines printed one by one; later ones are only counted.
_SHOWN_MALFORMED = 100
_SUMMARY_EVERY_S = 10.0


def add_import_command(commands: Any, connection_options: Any) -> None:
    """Add ``import`` to the ``klime`` command's sub-commands."""
    command = commands.add_parser(
        "import",
        help="send history: NDJSON/CSV exports (Klime, Segment, Mixpanel, PostHog)",
        description="Send events that already happened, with their own timestamps, exactly once "
        "by messageId (a line without one gets a deterministic id, so a file imported twice or "
        "resumed is kept once). Exit status: 0 all sent; 1 events rejected or the import stopped "
        "on server failures (resume with the same --checkpoint); 2 bad usage or configuration; "
        "3 malformed lines were skipped; 130 interrupted. See docs/backfill.md.",
    )
    command.add_argument("paths", nargs="+", metavar="PATH", help="NDJSON (or CSV) files; .gz is read too")
    command.add_argument(
        "--format",
        default="klime",
        choices=("klime", "segment", "csv", "mixpanel", "posthog"),
        help="what a line is (default: klime, Klime wire events)",
    )
    command.add_argument("--checkpoint", metavar="FILE", help="record progress here; resume from it")
    command.add_argument(
        "--rejects", metavar="FILE", help="append the events the server rejects here (NDJSON)"
    )
    command.add_argument("--dry-run", action="store_true", help="validate and count; send nothing")
    command.add_argument(
        "--concurrency", type=int, default=32, metavar="N", help="batches of 100 in flight (default: 32)"
    )
    command.add_argument("--quiet", action="store_true", help="no progress, only the summary")
    connection_options(command, top=False)


class _Display:
    """Progress and malformed lines on ``out`` (stderr): a self-updating line on a terminal."""

    def __init__(self, out: TextIO, *, quiet: bool) -> None:
        self.out = out
        self.quiet = quiet
        self.tty = out.isatty()
        self.shown = 0
        self.first: Optional[Any] = None
        self.last_summary = time.monotonic()
        self.line_open = False

    def malformed(self, label: str, line: int, reason: str) -> None:
        self.shown += 1
        if self.shown > _SHOWN_MALFORMED:
            return
        self._clear()
        print(printable(f"klime: {label}:{line}: {reason}"), file=self.out)
        if self.shown == _SHOWN_MALFORMED:
            print("klime: further malformed lines are counted, not shown", file=self.out)

    def progress(self, p: Any) -> None:
        if self.quiet:
            return
        if self.first is None:
            self.first = p
        done = p.sent if p.sent or p.events == 0 else p.events
        rate = done / p.seconds if p.seconds > 0 else 0.0
        text = f"klime import: {p.lines:,} lines, {p.sent:,} events sent, {rate:,.0f}/s"
        if p.bytes_total:
            share = min(1.0, p.bytes_done / p.bytes_total)
            read_now = p.bytes_done - self.first.bytes_done
            text += f", {share:.0%}"
            if 0 < read_now and p.seconds > 1:
                left = (p.bytes_total - p.bytes_done) * p.seconds / read_now
                text += f", ETA {int(left) // 60}:{int(left) % 60:02d}"
        if p.malformed or p.rejected:
            text += f" ({p.malformed:,} malformed, {p.rejected:,} rejected)"
        if self.tty:
            self.out.write("\r" + text + "\x1b[K")
            self.out.flush()
            self.line_open = True
        elif time.monotonic() - self.last_summary >= _SUMMARY_EVERY_S:
            self.last_summary = time.monotonic()
            print(text, file=self.out)

    def _clear(self) -> None:
        if self.line_open:
            self.out.write("\r\x1b[K")
            self.line_open = False

    def summary(self, result: Any, rejects: Optional[str]) -> None:
        self._clear()
        r = result
        rate = r.sent / r.seconds if r.seconds > 0 else 0.0
        what = "checked" if r.dry_run else "sent"
        count = r.events if r.dry_run else r.sent
        print(
            f"klime import: {r.lines:,} lines read, {r.events:,} events, {count:,} {what} "
            f"in {r.seconds:.1f}s ({rate:,.0f}/s, {r.requests:,} requests, {r.retries:,} retries)",
            file=self.out,
        )
        if r.resumed_inputs:
            print(f"klime import: resumed from the checkpoint ({r.resumed_inputs} input(s))", file=self.out)
        if r.skipped:
            reasons = ", ".join(f"{n:,} {why}" for why, n in sorted(r.skip_reasons.items()))
            print(f"klime import: {r.skipped:,} lines skipped: not Klime events ({reasons})", file=self.out)
        if r.malformed:
            print(f"klime import: {r.malformed:,} malformed lines skipped", file=self.out)
        if r.rejected:
            where = f"written to {printable(rejects)}" if rejects else "not kept (use --rejects FILE)"
            print(f"klime import: {r.rejected:,} events rejected by the server, {where}", file=self.out)
        if r.stopped:
            print(printable(f"klime import: stopped: {r.stopped}"), file=self.out)
        if r.failed or r.unsent:
            print(
                f"klime import: {r.failed + r.unsent:,} events not delivered; run again with the same "
                "--checkpoint to resume",
                file=self.out,
            )


def _exit_status(result: Any) -> int:
    if result.interrupted:
        return INTERRUPTED
    if result.rejected or result.failed or result.unsent or result.stopped:
        return SEND_FAILED
    if result.malformed:
        return MALFORMED
    return OK


def import_command(args: argparse.Namespace) -> int:
    """Run ``klime import``; blocks until every file is sent (or the import stops). Returns
    the exit status (see the module docstring)."""
    from .._backfill import Importer
    from .._import_sources import FileInput

    display = _Display(sys.stderr, quiet=args.quiet)
    try:
        inputs = [FileInput(path, csv_rows=args.format == "csv") for path in args.paths]
        importer = Importer(
            write_key=args.write_key,
            endpoint=args.endpoint,
            checkpoint=args.checkpoint,
            rejects=args.rejects,
            concurrency=args.concurrency,
            dry_run=args.dry_run,
            batch_timeout=args.timeout,
            on_malformed=display.malformed,
            progress=display.progress,
        )
        result = importer.run(inputs, args.format)
    except ConfigurationError as exc:
        return fail(exc, USAGE)
    except OSError as exc:
        return fail(f"import failed: {exc}", USAGE)
    display.summary(result, args.rejects)
    if args.json:
        print(json.dumps(asdict(result), sort_keys=True))
    return _exit_status(result)
