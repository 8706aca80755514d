"""History import: the pipeline of one run (reading, the window, workers, the watermark).

The reader (the caller's thread) turns each line into wire events (:mod:`._import_formats`),
gathers them into batches of up to 100 and hands each batch to one of ``concurrency`` worker
threads, which deliver it through klime's :class:`~klime._delivery.Delivery` (its counters,
413 halving) over the sender. At most ``concurrency`` batches are between reading and
settled at once: the reader waits on a semaphore (backpressure; memory stays flat). A batch
is *settled* once the server accepted it or its rejected events are in the rejects file. The
checkpoint records, per input, the position below which every batch is settled (a
contiguous watermark); with a checkpoint a batch's slot in the window is freed only once the
checkpoint that covers it is on disk, so a run killed at any point (SIGKILL included)
re-sends at most one window of events.

A whole-batch failure that says nothing about the events (retries ran out, 401/403/404, a
request that could not be made) stops the run: nothing after that batch counts as settled,
and a later run with the same checkpoint resumes there.

May import: the model, the senders' interface, :mod:`._delivery`, the other ``_import_``
modules and the standard library. One run at a time per :class:`Run`; its callbacks are
called on the reader's thread.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._deadline import Deadline
from ._delivery import KEEP_UNSENT, Delivery, Outcome
from ._import_formats import FORMATS, Malformed, Record, Unmappable, csv_row, encode_record
from ._import_sources import Position, RejectsFile, rejection_reasons, write_checkpoint
from .senders.base import Sender

__all__ = ["BATCH_EVENTS", "FORMAT_NAMES", "ImportResult", "Progress", "Run", "RunSettings"]

BATCH_EVENTS = 100
#: Whole-batch refusals that are about the events (they go to the rejects file); any other
#: whole-batch failure stops the import.
_EVENT_STATUSES = (400, 413, 422)
_PROGRESS_EVERY_S = 0.25
FORMAT_NAMES = ("klime", "segment", "csv", "mixpanel", "posthog")


@dataclass
class ImportResult:
    """What an import did (this run; lines a checkpoint said were done are not re-counted).

    ``events == sent + rejected + failed + unsent`` (a dry run only counts ``events``, the
    valid ones). ``failed``: not delivered because the server kept failing (the run
    stopped; resume it). ``unsent``: built but never sent because the run stopped.
    ``malformed`` lines were reported and skipped; ``skipped`` lines cannot become a Klime
    event (``skip_reasons`` says why: a page call, only an anonymousId, ...).
    """

    lines: int = 0
    events: int = 0
    sent: int = 0
    rejected: int = 0
    failed: int = 0
    unsent: int = 0
    malformed: int = 0
    skipped: int = 0
    resumed_inputs: int = 0
    requests: int = 0
    retries: int = 0
    seconds: float = 0.0
    dry_run: bool = False
    interrupted: bool = False
    stopped: Optional[str] = None
    skip_reasons: Dict[str, int] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every input was read to its end and every event settled (sent or rejected)."""
        return self.stopped is None and not self.interrupted and not (self.failed or self.unsent)


@dataclass(frozen=True)
class Progress:
    """A snapshot for a progress display: counts so far, and bytes read of the inputs."""

    lines: int
    events: int
    sent: int
    rejected: int
    malformed: int
    skipped: int
    bytes_done: int
    bytes_total: int
    seconds: float


MalformedCallback = Callable[[str, int, str], Any]
ProgressCallback = Callable[[Progress], Any]


@dataclass(frozen=True)
class RunSettings:
    """How a run goes: see :class:`klime._backfill.Importer` for each option."""

    checkpoint: Optional[str] = None
    rejects: Optional[str] = None
    concurrency: int = 32
    dry_run: bool = False
    batch_timeout: float = 120.0
    on_malformed: Optional[MalformedCallback] = None
    progress: Optional[ProgressCallback] = None


class Run:
    """One import run: the reader on the caller's thread (:meth:`read_all`), the worker
    threads, and the checkpoint writer thread (with a checkpoint). Call :meth:`finish` after
    :meth:`read_all`, always (it blocks until the workers are done)."""

    def __init__(
        self,
        settings: RunSettings,
        sender: Optional[Sender],
        inputs: List[Any],
        fmt: str,
        recorded: Dict[str, Dict[str, Any]],
    ) -> None:
        self.imp = importer = settings
        self.inputs = inputs
        self.fmt = fmt
        self.parse: Callable[[Any], List[Record]] = csv_row if fmt == "csv" else FORMATS[fmt]
        self.result = ImportResult(dry_run=importer.dry_run)
        self.started = time.monotonic()
        self.lock = threading.Condition(threading.Lock())
        self.stop = threading.Event()
        self.window = threading.Semaphore(importer.concurrency)
        self.jobs: SimpleQueue[Optional[Tuple[int, List[bytes]]]] = SimpleQueue()
        self.rejects = RejectsFile(None if importer.dry_run else importer.rejects)
        self.delivery = Delivery(sender) if sender is not None and not importer.dry_run else None
        self.deadlines: set[Deadline] = set()
        # the watermark: per input [line, offset, done]; batches by sequence number
        self.marks = [self._start(item, recorded.get(item.name)) for item in inputs]
        self.result.resumed_inputs = sum(1 for m in self.marks if m[0] or m[2])
        self.positions: Dict[int, Tuple[int, int, int, bool, bool]] = {}
        self.settled: set[int] = set()
        self.next_seq = 0
        self.next_mark = 0
        self.open_batch: List[bytes] = []  # events read, not yet handed to a worker
        self.unreleased = 0  # window slots to free once the next checkpoint is written
        self.dirty = False
        self.last_progress = 0.0
        self.workers = [
            threading.Thread(target=self._work, name=f"klime-import-{i}", daemon=True)
            for i in range(importer.concurrency if self.delivery is not None else 0)
        ]
        for worker in self.workers:
            worker.start()
        self.writer: Optional[threading.Thread] = None
        if importer.checkpoint:
            self.writer = threading.Thread(
                target=self._write_loop, name="klime-import-checkpoint", daemon=True
            )
            self.writer.start()

    @staticmethod
    def _start(item: Any, entry: Optional[Dict[str, Any]]) -> List[Any]:
        if entry is None:
            return [0, 0, False]
        return [int(entry.get("line", 0)), int(entry.get("offset", 0)), bool(entry.get("done"))]

    # ------------------------------------------------------------------ reading (caller's thread)

    def read_all(self) -> None:
        for index, item in enumerate(self.inputs):
            line, offset, done = self.marks[index]
            if done:
                continue
            if not self._read(index, item, (line, offset)):
                return

    def _read(self, index: int, source: Any, start: Position) -> bool:
        result, parse, on_malformed = self.result, self.parse, self.imp.on_malformed
        batch = self.open_batch = []
        end = start
        for line_no, offset, item in source.items(start):
            if self.stop.is_set():
                return False
            result.lines += 1
            try:
                if isinstance(item, bytes):
                    if not item.strip():
                        end = (line_no, offset)
                        continue
                    try:
                        item = json.loads(item)
                    except ValueError as exc:
                        raise Malformed(f"not valid JSON: {exc}") from None
                encoded = [encode_record(record)[0] for record in parse(item)]
            except Malformed as exc:
                result.malformed += 1
                if on_malformed is not None:
                    on_malformed(source.label, line_no, str(exc))
                end = (line_no, offset)
                continue
            except Unmappable as exc:
                result.skipped += 1
                reason = str(exc)
                result.skip_reasons[reason] = result.skip_reasons.get(reason, 0) + 1
                end = (line_no, offset)
                continue
            if len(batch) + len(encoded) > BATCH_EVENTS:
                if not self._submit(index, end, batch, False):
                    return False
                batch = self.open_batch = []
            batch.extend(encoded)
            result.events += len(encoded)
            end = (line_no, offset)
            if time.monotonic() - self.last_progress >= _PROGRESS_EVERY_S:
                self.report_progress()
        if self.stop.is_set():
            return False
        return self._submit(index, end, batch, True)

    def _submit(self, index: int, end: Position, batch: List[bytes], done: bool) -> bool:
        """Hand ``batch`` to a worker, waiting for a slot in the window (backpressure).
        False when the run stopped meanwhile (``batch`` is then left to :meth:`finish`)."""
        holds = bool(batch) and self.delivery is not None
        with self.lock:
            seq = self.next_seq
            self.next_seq += 1
            self.positions[seq] = (index, end[0], end[1], done, holds)
        if not holds:
            self._settle(seq)
            self.open_batch = []
            return True
        while not self.window.acquire(timeout=0.1):
            if self.stop.is_set():
                return False  # finish() counts the open batch as unsent
        self.jobs.put((seq, batch))
        self.open_batch = []  # a worker's now
        return True

    def report_progress(self) -> None:
        self.last_progress = time.monotonic()
        if self.imp.progress is None:
            return
        r = self.result
        with self.lock:
            sent, rejected = r.sent, r.rejected
        self.imp.progress(
            Progress(
                r.lines,
                r.events,
                sent,
                rejected,
                r.malformed,
                r.skipped,
                sum(item.bytes_read() if not m[2] else item.size for item, m in zip(self.inputs, self.marks)),
                sum(item.size for item in self.inputs),
                self.last_progress - self.started,
            )
        )

    # ------------------------------------------------------------------ sending (workers)

    def _work(self) -> None:
        assert self.delivery is not None
        while True:
            job = self.jobs.get()
            if job is None:
                return
            seq, batch = job
            if self.stop.is_set():
                with self.lock:
                    self.result.unsent += len(batch)
                self.window.release()
                continue
            deadline = Deadline.after(self.imp.batch_timeout)
            with self.lock:
                self.deadlines.add(deadline)
            try:
                outcome = self.delivery.send(batch, deadline, report=False, keep=KEEP_UNSENT)
            finally:
                with self.lock:
                    self.deadlines.discard(deadline)
            if self._account(outcome):
                self._settle(seq)
            else:
                self.window.release()

    def _account(self, outcome: Outcome) -> bool:
        """Count ``outcome``; write its rejections. False when the batch is not settled
        (the run then stops: nothing after it may count as settled)."""
        rejected = failed = 0
        reason: Optional[str] = None
        for error in outcome.errors or ():
            if error.response is None and (error.retryable or error.status_code not in _EVENT_STATUSES):
                failed += len(error.events)
                reason = reason or error.message
                continue
            self.rejects.write(error.events, rejection_reasons(error))
            rejected += len(error.events)
        if outcome.unsent and reason is None:
            last = outcome.last_error
            reason = f"a batch was not delivered within the timeout ({last.message if last else 'not sent'})"
        with self.lock:
            r = self.result
            r.sent += outcome.sent
            r.rejected += rejected
            r.failed += failed
            r.unsent += len(outcome.unsent or ())
            if reason is not None and not self.stop.is_set():
                if not r.interrupted:
                    r.stopped = reason
                self.stop.set()
        return reason is None

    def _settle(self, seq: int) -> None:
        """Mark batch ``seq`` settled and move the watermark over every settled prefix."""
        with self.lock:
            self.settled.add(seq)
            if self.writer is None and self.positions[seq][4]:
                self.window.release()
            while self.next_mark in self.settled:
                self.settled.discard(self.next_mark)
                index, line, offset, done, holds = self.positions.pop(self.next_mark)
                self.marks[index] = [line, offset, done]
                self.next_mark += 1
                if holds and self.writer is not None:
                    self.unreleased += 1
                self.dirty = True
            if self.dirty and self.writer is not None:
                self.lock.notify_all()

    # ------------------------------------------------------------------ the checkpoint

    def _entries(self) -> List[Dict[str, Any]]:
        return [
            {"name": item.name, "fingerprint": item.fingerprint, "line": m[0], "offset": m[1], "done": m[2]}
            for item, m in zip(self.inputs, self.marks)
        ]

    def _write_loop(self) -> None:
        while True:
            with self.lock:
                while not self.dirty and not self.stop.is_set() and self.writer is not None:
                    self.lock.wait()
                if not self.dirty:
                    return
                entries, release = self._entries(), self.unreleased
                self.dirty, self.unreleased = False, 0
            self._write(entries)
            for _ in range(release):
                self.window.release()

    def _write(self, entries: List[Dict[str, Any]]) -> None:
        assert self.imp.checkpoint is not None
        self.rejects.sync()  # a settled rejection is on disk before the watermark passes it
        write_checkpoint(self.imp.checkpoint, self.fmt, entries)

    # ------------------------------------------------------------------ the end

    def finish(self) -> None:
        """Stop the workers (after the queued batches, or at once when stopping), write the
        final checkpoint, close the rejects file and the sender. Blocks."""
        with self.lock:
            self.result.unsent += 0 if self.delivery is None else len(self.open_batch)
        if self.result.interrupted:
            self.stop.set()
            with self.lock:
                for deadline in self.deadlines:
                    deadline.tighten(time.monotonic())
        for _ in self.workers:
            self.jobs.put(None)
        for worker in self.workers:
            worker.join()
        writer = self.writer
        if writer is not None:
            with self.lock:
                self.writer = None
                self.stop.set()
                self.lock.notify_all()
            writer.join()
            with self.lock:
                entries = self._entries()
            self._write(entries)
        self.rejects.close()
        if self.delivery is not None:
            counters = self.delivery.counters()
            self.result.requests, self.result.retries = counters["requests"], counters["retries"]
            self.delivery.sender.close()
        self.result.seconds = time.monotonic() - self.started
        self.report_progress()
