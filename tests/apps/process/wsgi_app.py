"""A WSGI app for the process-model tests (gunicorn, uWSGI).

It creates a klime client and tracks events at import (in a prefork server's master, unless
apps are loaded lazily) and on each request. Before tracking, every process appends one line
per event to ``$KLIME_TEST_LEDGER/<pid>.log``: the tests compare that ledger of what was
produced with what reached the collector.

Environment: ``KLIME_ENDPOINT``, ``KLIME_WRITE_KEY``, ``KLIME_TEST_LEDGER`` (required);
``KLIME_TEST_IMPORT_EVENTS`` (events at import, default 3); ``KLIME_TEST_MIDDLEWARE=1`` wraps
the app in klime's WSGI middleware; ``KLIME_TEST_FLUSH_INTERVAL`` (ms, default 2000);
``KLIME_TEST_RETRY_DELAY`` (ms, default 10) and ``KLIME_TEST_RETRY_ATTEMPTS`` (default 5);
``KLIME_TEST_SPOOL`` (a directory: the durable spool).

Routes: ``GET /track?n=K`` tracks K events and answers ``{"pid": ..., "tags": [...]}``;
``GET /info`` answers the pid, the klime thread state and the client's stats.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
from typing import Any, Callable, Dict, Iterable, List
from urllib.parse import parse_qs

import klime

LEDGER = os.environ["KLIME_TEST_LEDGER"]
_counter = itertools.count()
_counter_lock = threading.Lock()

if os.environ.get("KLIME_TEST_DEBUG") == "1":
    import logging
    import sys

    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter("%(process)d %(threadName)s klime %(levelname)s %(message)s"))
    logging.getLogger("klime").addHandler(_handler)
    logging.getLogger("klime").setLevel(logging.DEBUG)


if os.environ.get("KLIME_TEST_EXIT_STATS") == "1":
    import atexit

    def _write_exit_stats() -> None:  # registered first, so it runs after klime's own hook
        with open(os.path.join(LEDGER, f"{os.getpid()}.exit"), "w") as out:
            json.dump(client.stats(), out)

    atexit.register(_write_exit_stats)
    try:
        import uwsgi  # type: ignore[import-not-found]

        _previous_uwsgi_atexit = getattr(uwsgi, "atexit", None)

        def _uwsgi_atexit_marker() -> None:
            with open(os.path.join(LEDGER, f"{os.getpid()}.uwsgi-atexit"), "w") as out:
                json.dump(client.stats(), out)
            if _previous_uwsgi_atexit is not None:
                _previous_uwsgi_atexit()

        uwsgi.atexit = _uwsgi_atexit_marker
    except ImportError:
        pass


def on_error(error: klime.SendError, events: List[Dict[str, Any]]) -> None:
    """Ledger of failures: one line per event that klime gave up on."""
    with open(os.path.join(LEDGER, f"{os.getpid()}.errors"), "a") as ledger:
        for event in events:
            ledger.write(f"{event.get('properties', {}).get('tag')} {error.message}\n")


client = klime.Client(
    flush_interval=float(os.environ.get("KLIME_TEST_FLUSH_INTERVAL", "2000")),
    retry_initial_delay=float(os.environ.get("KLIME_TEST_RETRY_DELAY", "10")),
    retry_max_attempts=int(os.environ.get("KLIME_TEST_RETRY_ATTEMPTS", "5")),
    on_error=on_error,
    spool=os.environ.get("KLIME_TEST_SPOOL") or None,
)


def produce(kind: str, n: int) -> List[str]:
    """Record ``n`` events of ``kind`` in the ledger, then track them. Thread-safe."""
    pid = os.getpid()
    with _counter_lock:
        tags = [f"{kind}-{pid}-{next(_counter)}" for _ in range(n)]
    with open(os.path.join(LEDGER, f"{pid}.log"), "a") as ledger:
        ledger.write("".join(tag + "\n" for tag in tags))
    for tag in tags:
        client.track("Process Test", {"tag": tag, "pid": pid}, user_id="user-1")
    return tags


produce("import", int(os.environ.get("KLIME_TEST_IMPORT_EVENTS", "3")))

# Tells the tests that this process has imported the app (one file per importing process).
open(os.path.join(LEDGER, f"{os.getpid()}.ready"), "w").close()


def _json(start_response: Callable[..., Any], body: Dict[str, Any]) -> Iterable[bytes]:
    data = json.dumps(body).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if path == "/track":
        tags = produce("request", int(query.get("n", ["1"])[0]))
        return _json(start_response, {"pid": os.getpid(), "tags": tags})
    if path == "/info":
        threads = [t.name for t in threading.enumerate()]
        return _json(start_response, {"pid": os.getpid(), "threads": threads, "stats": client.stats()})
    return _json(start_response, {"pid": os.getpid()})


if os.environ.get("KLIME_TEST_MIDDLEWARE") == "1":
    from klime.integrations.wsgi import KlimeMiddleware

    app = KlimeMiddleware(app, client=client)  # type: ignore[assignment]

application = app
