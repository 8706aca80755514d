"""The ``klime`` command: send one event from a shell, or run a local collector.

::

    klime track "Signup" --user-id u1 --prop plan=pro --prop seats=3
    klime identify u1 --trait email=ada@example.com
    klime group org_1 --user-id u1 --trait name="Acme Inc"
    klime listen --port 8787          # a local collector that prints what arrives
    klime spool /var/lib/myapp/klime  # what a durable spool holds; --send / --clear --yes
    klime import events.ndjson.gz --checkpoint import.ckpt --rejects rejects.ndjson

``track``, ``identify`` and ``group`` send at once on the calling thread (the ``*_sync``
calls), print the server's answer and exit with status 0; on failure they print the error
on stderr and exit with 1 (2 for bad usage, bad input or missing configuration). The write
key comes from ``--write-key`` or ``KLIME_WRITE_KEY``, the endpoint from ``--endpoint`` or
``KLIME_ENDPOINT``. ``--prop``/``--trait`` values are parsed as JSON when they are valid
JSON (``3``, ``true``, ``["a","b"]``, ``"007"``) and taken as strings otherwise.

``spool DIR`` shows what a durable spool holds (events, bytes, oldest event, owners alive and
dead) and exits 0; ``--send`` sends the events of processes that are gone (a live process
keeps its own) and exits 0 when nothing was rejected or left behind, else 1; ``--clear
--yes`` deletes every spooled event. A missing directory or bad usage exits with 2.

``import PATH...`` sends history (``--format klime|segment|csv|mixpanel|posthog``) with
each event's own timestamp, exactly once by messageId, resumable with ``--checkpoint``; its
exit statuses (0 all sent, 1 events rejected or the import stopped, 2 usage, 3 malformed
lines skipped, 130 interrupted) are in :mod:`._import` and docs/backfill.md.

Also runnable as ``python -m klime.cli``. The parts: :mod:`._main` (arguments and
:func:`main`), :mod:`._send` (track/identify/group), :mod:`._spool`, :mod:`._listen`,
:mod:`._import`,
:mod:`._status` (exit statuses). A tool on top of klime: it may import any layer below it
(on first use, where the import is heavy), never the ``klime`` package itself.
"""

from __future__ import annotations

from ._main import main
from ._main import parse_value as parse_value

__all__ = ["main"]
