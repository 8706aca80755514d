"""A Klime-compatible collector on 127.0.0.1, for the demo, the test suite and debugging.

It speaks the wire protocol of DESIGN.md section 3 (``POST /v1/batch``), validates requests
and events the way Klime's servers do, records what arrived, and can misbehave on purpose
(fault injection) so that retry, timeout and partial-failure paths can be exercised over real
sockets::

    from klime.devserver import Collector, Fault

    with Collector() as collector:            # binds 127.0.0.1 on a free port
        collector.respond(Fault.status_code(500), Fault.retry(429, retry_after="1"))
        ...                                   # point the SDK at collector.url
        assert collector.wait_for_events(3, timeout=5)
        print(collector.events())

From a shell, ``python -m klime.devserver --help``; ``python -m klime.devserver --port 0 --
CMD ARGS...`` runs CMD with ``KLIME_ENDPOINT`` and ``KLIME_WRITE_KEY`` pointing here, echoes
what arrives and prints a summary.

The package, one job a module (each lists what it may import)::

    _collector.py   Collector: the public object; wires the parts below together
    _http.py        the HTTP server: sockets, bodies, routing, carrying out the faults
    _bodies.py      request bodies off the wire (Content-Length, chunked, the size limit)
    _answers.py     Klime's answers: validation of requests and events, response bodies
    _control.py     the /_klime/ control endpoints (the Collector's calls over HTTP) and who may call them
    _faults.py      Fault and FaultSchedule: scripted, standing and random faults
    _record.py      RecordedRequest and Arrivals: what arrived, when, and what is in flight
    _printer.py     the echo: one line per event, and the summary
    _cli.py         the command line (``__main__.py`` runs it)

Lower modules never import higher ones: ``_faults``, ``_record`` and ``_printer`` import only
the standard library; ``_answers`` and ``_bodies`` add :mod:`klime._config`; ``_control`` and
``_http`` build on those; ``_collector`` on all of them; ``_cli`` on the collector. The package imports only
the standard library and :mod:`klime._config`, so it starts fast and keeps working while the
rest of the SDK changes.

Threading: the server answers every connection in its own daemon thread (HTTP/1.1 keep-alive).
Every public method of :class:`Collector` is thread-safe; the ones that block say so.
"""

from __future__ import annotations

from ._cli import main
from ._collector import Collector
from ._faults import DEFAULT_DRIP_DELAY, DEFAULT_SLOW_DELAY, DRIP_CHUNK_BYTES, FAULT_KINDS, Fault
from ._record import RecordedRequest

__all__ = [
    "DEFAULT_DRIP_DELAY",
    "DEFAULT_SLOW_DELAY",
    "DRIP_CHUNK_BYTES",
    "FAULT_KINDS",
    "Collector",
    "Fault",
    "RecordedRequest",
    "main",
]
