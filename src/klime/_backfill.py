"""History import: send events that already happened, exactly once by messageId, resumably.

The public entry points: :func:`backfill` (a Python iterable of mappings: an ORM queryset, a
generator, a parsed export) and :func:`import_files` (the NDJSON/CSV files of ``klime
import``), both built on :class:`Importer`, which sets up the sender and the checkpoint and
runs the pipeline of :mod:`._import_run`. See docs/backfill.md.

May import: the model, the senders, the ``_import_`` modules and the standard library.
Blocking; an :class:`Importer` runs one import at a time (not thread-safe to share).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from ._config import DEFAULT_ENDPOINT, DEFAULT_MAX_CONCURRENT_REQUESTS, ENV_ENDPOINT, ENV_WRITE_KEY, env
from ._import_run import (
    FORMAT_NAMES,
    ImportResult,
    MalformedCallback,
    Progress,
    ProgressCallback,
    Run,
    RunSettings,
)
from ._import_sources import FileInput, IterableInput, load_checkpoint
from .errors import ConfigurationError
from .senders.base import Sender

__all__ = ["FORMAT_NAMES", "ImportResult", "Importer", "Progress", "backfill", "import_files"]


class Importer:
    """One import run over one or more inputs. :meth:`run` blocks until it ends.

    ``sender`` replaces the HTTP sender (tests); without it ``write_key`` (or
    ``$KLIME_WRITE_KEY``) is required unless ``dry_run``.
    """

    def __init__(
        self,
        *,
        write_key: Optional[str] = None,
        endpoint: Optional[str] = None,
        checkpoint: Optional[str] = None,
        rejects: Optional[str] = None,
        concurrency: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        dry_run: bool = False,
        batch_timeout: float = 120.0,
        on_malformed: Optional[MalformedCallback] = None,
        progress: Optional[ProgressCallback] = None,
        sender: Optional[Sender] = None,
    ) -> None:
        if not isinstance(concurrency, int) or not 1 <= concurrency <= 128:
            raise ConfigurationError("concurrency must be an int from 1 to 128")
        self.settings = RunSettings(
            None if dry_run else checkpoint,
            rejects,
            concurrency,
            dry_run,
            batch_timeout,
            on_malformed,
            progress,
        )
        self._sender = sender
        if sender is None and not dry_run:
            from .senders.http import HttpSender

            key = write_key or env(ENV_WRITE_KEY)
            if not key:
                raise ConfigurationError(f"a write key is required (write_key= or ${ENV_WRITE_KEY})")
            url = endpoint or env(ENV_ENDPOINT) or DEFAULT_ENDPOINT
            self._sender = HttpSender(key, url, pool_size=concurrency)

    def __repr__(self) -> str:  # never shows the write key
        return f"Importer(sender={self._sender!r}, concurrency={self.settings.concurrency})"

    # ------------------------------------------------------------------ the run

    def run(self, inputs: Sequence[Any], fmt: str) -> ImportResult:
        """Import ``inputs`` (:class:`FileInput`/:class:`IterableInput`) in format ``fmt``.

        Blocks until every input is read and every batch settled, or the run stopped
        (``ImportResult.stopped``) or was interrupted (Ctrl-C: ``interrupted``, the
        checkpoint written). Raises ConfigurationError for an unusable checkpoint.
        """
        if fmt not in FORMAT_NAMES:
            raise ConfigurationError(f"unknown format {fmt!r}; one of {', '.join(FORMAT_NAMES)}")
        checkpoint = self.settings.checkpoint
        recorded = load_checkpoint(checkpoint, list(inputs), fmt) if checkpoint else {}
        run = Run(self.settings, self._sender, list(inputs), fmt, recorded)
        try:
            run.read_all()
        except KeyboardInterrupt:
            run.result.interrupted = True
        finally:
            run.finish()
        return run.result


def import_files(paths: Sequence[str], *, format: str = "klime", **options: Any) -> ImportResult:
    """Import NDJSON (or, with ``format="csv"``, CSV) files, ``.gz`` too; ``options`` are
    :class:`Importer`'s. Blocks until done. Raises ConfigurationError (unreadable file,
    unusable checkpoint, no write key)."""
    inputs = [FileInput(path, csv_rows=format == "csv") for path in paths]
    return Importer(**options).run(inputs, format)


def backfill(
    events: Iterable[Mapping[str, Any]],
    *,
    write_key: Optional[str] = None,
    endpoint: Optional[str] = None,
    format: str = "klime",
    checkpoint: Optional[str] = None,
    rejects: Optional[str] = None,
    concurrency: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
    dry_run: bool = False,
    on_malformed: Optional[MalformedCallback] = None,
    progress: Optional[ProgressCallback] = None,
) -> ImportResult:
    """Send past events (mappings in ``format``: ``"klime"`` wire events by default, whose
    ``userId``/``groupId``/``messageId`` may also be spelled ``user_id``/...) with their own
    timestamps, exactly once by messageId. With ``checkpoint``, a run that was killed resumes
    after the items already settled: ``events`` must then yield the same items in the same
    order (e.g. a query with ORDER BY). Blocks until done; a Ctrl-C writes the checkpoint and
    is raised again. See docs/backfill.md."""
    if format == "csv":
        raise ConfigurationError('format="csv" is for files; pass mappings in another format')
    importer = Importer(
        write_key=write_key,
        endpoint=endpoint,
        checkpoint=checkpoint,
        rejects=rejects,
        concurrency=concurrency,
        dry_run=dry_run,
        on_malformed=on_malformed,
        progress=progress,
    )
    result = importer.run([IterableInput(events)], format)
    if result.interrupted:
        raise KeyboardInterrupt
    return result
