"""History import: where the lines come from, and the checkpoint that says how far they got.

An input is a file (newline-delimited JSON or CSV, gzip-compressed when its name ends in
``.gz``) or a Python iterable. Each yields ``(line, offset, item)``: the line number of the
item's last line, the byte offset just past it (in the decompressed stream; 0 for an
iterable) and the item (a line's bytes, a CSV row as a dict, or the iterable's mapping).
Reading can start at a position a checkpoint recorded: a plain file seeks to the offset, a
gzip file and an iterable are read and skipped up to it.

The rejects file is NDJSON: each event the server refused, as its wire dict, with a
``_rejected`` field (reason, code, HTTP status); the ``klime`` format ignores that field, so
the file can be fixed and imported again as it is.

The checkpoint file is JSON, rewritten atomically (temporary file, fsync, ``os.replace``,
fsync of the directory): per input its name, a fingerprint (size and the SHA-256 of its
first 64 KiB) and the position below which every batch is settled, and whether it is done.

May import: the model (errors) and the standard library. Not thread-safe, except the
rejects file: an input is read by one thread; :func:`write_checkpoint` is called by one
thread at a time.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import os
import threading
from typing import IO, Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, cast

from .errors import ConfigurationError, SendError

__all__ = [
    "CHECKPOINT_VERSION",
    "FileInput",
    "IterableInput",
    "Position",
    "RejectsFile",
    "rejection_reasons",
    "load_checkpoint",
    "write_checkpoint",
]

CHECKPOINT_VERSION = 1
_HEAD_BYTES = 64 * 1024

#: (line number, byte offset): everything up to and including that line.
Position = Tuple[int, int]


class FileInput:
    """One file to import: NDJSON (``csv=False``) or CSV with a header row; ``.gz`` too."""

    def __init__(self, path: str, *, csv_rows: bool = False) -> None:
        self.path = path
        self.name = os.path.abspath(path)
        self.csv_rows = csv_rows
        self.gzipped = path.endswith(".gz")
        self._raw: Optional[IO[bytes]] = None
        self._finished = False
        try:
            with open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                head = f.read(_HEAD_BYTES)
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror or exc}") from None
        self.fingerprint = f"{self.size}:{hashlib.sha256(head).hexdigest()}"

    @property
    def label(self) -> str:
        return self.path

    def bytes_read(self) -> int:
        """How far into the file (compressed bytes for ``.gz``) reading has got."""
        raw = self._raw
        if self._finished:
            return self.size
        try:
            return raw.tell() if raw is not None and not raw.closed else 0
        except (OSError, ValueError):
            return 0

    def items(self, start: Position) -> Iterator[Tuple[int, int, Any]]:
        """``(line, offset, item)`` after ``start``. Blocks on file reads."""
        line_no, offset = start
        raw = open(self.path, "rb")
        self._raw = raw
        try:
            unzipped = gzip.GzipFile(fileobj=raw, mode="rb") if self.gzipped else None
            stream: IO[bytes] = raw if unzipped is None else cast(IO[bytes], unzipped)
            header: Optional[List[str]] = None
            position = 0
            if self.csv_rows:
                first = stream.readline()
                position = len(first)
                header = next(csv.reader([first.decode("utf-8-sig")]), [])
                if line_no == 0:
                    line_no, offset = 1, position
            if offset > position:
                if self.gzipped:
                    _skip_to(stream, offset - position)
                else:
                    raw.seek(offset)
            lines = _lines(stream, line_no, offset)
            if header is None:
                yield from lines
            else:
                yield from _csv_rows(lines, header)
            self._finished = True
        finally:
            raw.close()


def _skip_to(stream: IO[bytes], count: int) -> None:
    """Read and discard ``count`` bytes of a gzip stream (up to a line boundary of an earlier run)."""
    while count > 0:
        chunk = stream.read(min(count, 1 << 20))
        if not chunk:
            raise ConfigurationError("the checkpoint points past the end of the file")
        count -= len(chunk)


def _lines(stream: IO[bytes], line_no: int, offset: int) -> Iterator[Tuple[int, int, Any]]:
    for line in stream:
        line_no += 1
        offset += len(line)
        yield line_no, offset, line


def _csv_rows(lines: Iterator[Tuple[int, int, Any]], header: List[str]) -> Iterator[Tuple[int, int, Any]]:
    """CSV rows (quoted cells may span lines), each with the position of its last line."""
    where = [0, 0]

    def text() -> Iterator[str]:
        for line_no, offset, line in lines:
            where[0], where[1] = line_no, offset
            yield line.decode("utf-8", "replace")

    for row in csv.DictReader(text(), fieldnames=header):
        if not any(row.values()):
            continue
        yield where[0], where[1], row


class IterableInput:
    """A Python iterable of mappings; its position is the count of items taken."""

    name = "<events>"
    fingerprint = None
    label = "events"
    size = 0

    def __init__(self, events: Iterable[Any]) -> None:
        self._events = events
        self._count = 0

    def bytes_read(self) -> int:
        return 0

    def items(self, start: Position) -> Iterator[Tuple[int, int, Any]]:
        """The items after the first ``start[0]`` (those are taken and dropped)."""
        skip = start[0]
        for index, item in enumerate(self._events, 1):
            if index > skip:
                yield index, 0, item


# ---------------------------------------------------------------------------------------
# the checkpoint file


def load_checkpoint(path: str, inputs: List[Any], fmt: str) -> Dict[str, Dict[str, Any]]:
    """The recorded state of each input by name (empty when ``path`` does not exist).

    Raises ConfigurationError when the checkpoint is unreadable, was written for another
    format, or names an input whose fingerprint differs (a different file of that name).
    """
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the checkpoint {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
        raise ConfigurationError(f"{path} is not a klime import checkpoint (version {CHECKPOINT_VERSION})")
    if data.get("format") != fmt:
        raise ConfigurationError(
            f"the checkpoint {path} was written for --format {data.get('format')}, not {fmt}; "
            "use another checkpoint file"
        )
    recorded = {str(entry.get("name")): entry for entry in data.get("inputs", []) if isinstance(entry, dict)}
    for item in inputs:
        entry = recorded.get(item.name)
        if entry is not None and entry.get("fingerprint") != item.fingerprint:
            raise ConfigurationError(
                f"{item.label} is not the file the checkpoint {path} was written for (its size or "
                "first 64 KiB differ); remove the checkpoint to import it from the start"
            )
    return recorded


def write_checkpoint(path: str, fmt: str, entries: List[Dict[str, Any]]) -> None:
    """Replace the checkpoint at ``path`` atomically and durably. Blocks on fsync."""
    body = json.dumps({"version": CHECKPOINT_VERSION, "format": fmt, "inputs": entries}, indent=1)
    directory = os.path.dirname(os.path.abspath(path))
    temp = f"{path}.tmp"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# the rejects file


class RejectsFile:
    """The rejects file: one wire event a line, with ``_rejected`` saying why. Thread-safe."""

    def __init__(self, path: Optional[str]) -> None:
        self._file: Optional[IO[bytes]] = open(path, "ab") if path else None
        self._lock = threading.Lock()
        self.first_reason: Optional[str] = None

    def write(self, events: Sequence[Mapping[str, Any]], reasons: Sequence[Dict[str, Any]]) -> None:
        lines = []
        for event, reason in zip(events, reasons):
            lines.append(
                json.dumps({**dict(event), "_rejected": reason}, ensure_ascii=False).encode() + b"\n"
            )
        with self._lock:
            if self.first_reason is None and reasons:
                self.first_reason = str(reasons[0].get("reason"))
            if self._file is not None:
                self._file.write(b"".join(lines))

    def sync(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()
                self._file.close()
                self._file = None


def rejection_reasons(error: SendError) -> List[Dict[str, Any]]:
    """One ``_rejected`` entry per event of ``error.events``, in order."""
    if error.response is not None and error.response.errors:
        by_index: Dict[int, Any] = {}
        for item in error.response.errors:
            by_index.setdefault(item.index, item)
        return [
            {"reason": e.message, "code": e.code, "status": error.status_code}
            for _, e in sorted(by_index.items())
        ]
    return [{"reason": error.message, "code": None, "status": error.status_code}] * len(error.events)
