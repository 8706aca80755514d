"""The :class:`Collector`: the one object tests and tools hold; it wires the parts together.

It owns a :class:`FaultSchedule` (what goes wrong next), an :class:`Arrivals` record (what
arrived, and what is in flight), a :class:`Printer` (the echo) and, once started, a
:class:`Server` serving them from a daemon thread; its methods are thin doors onto those
parts, and the ``/_klime/`` control endpoints call the same methods.

Imports: the standard library and the devserver's own modules (never the rest of klime).
"""

from __future__ import annotations

import functools
import random
import threading
from typing import Any, Mapping, TextIO

from ._answers import authorized
from ._control import control
from ._faults import Fault, FaultSchedule, random_table
from ._http import Server, make_server
from ._printer import Printer
from ._record import Arrivals, RecordedRequest

__all__ = ["Collector"]

#: How long :meth:`Collector.stop` waits for the requests it cut short to end.
_STOP_WAIT_S = 2.0


class Collector:
    """A Klime-compatible HTTP collector on a local port, with recording and fault injection.

    ``write_key=None`` accepts any non-empty Bearer token; otherwise the token must equal
    ``write_key`` (401 otherwise), and the ``/_klime/`` control endpoints require it too
    (``Authorization: Bearer <write_key>``). The control endpoints answer only requests
    addressed to this server (Host) and not sent cross-origin by a browser (Origin).
    ``echo`` receives one line per accepted event and per rejected or faulted request, its
    control characters escaped. ``seed`` is the seed :meth:`set_random_faults` uses when it
    is given none. Nothing is bound until :meth:`start`.

    All methods are thread-safe. :meth:`start` returns once the socket is listening;
    :meth:`stop` and the ``wait_for_*`` methods block (stop briefly).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        write_key: str | None = None,
        echo: TextIO | None = None,
        seed: int | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.write_key = write_key
        self.seed = seed
        self._printer = Printer(echo)
        self._arrivals = Arrivals()
        self._faults = FaultSchedule()
        self._lock = threading.Lock()
        self._stopping = False
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> Collector:
        """Bind and serve in a daemon thread; return self. Blocks only while binding.

        Calling it again while running does nothing; a stopped collector cannot restart.
        """
        with self._lock:
            if self._stopping:
                raise RuntimeError("this Collector was stopped; create a new one")
            if self._server is not None:
                return self
            server = make_server(
                self.host,
                self._requested_port,
                arrivals=self._arrivals,
                faults=self._faults,
                printer=self._printer,
                authorize=self._authorized,
                control=functools.partial(control, self),
                control_key=self._control_key,
            )
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="klime-devserver",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every connection. Idempotent; blocks ~50 ms (2 s at most).

        Black-holed, slow and dripping requests are released (their connections reset), the
        listening socket is closed and waiters in the ``wait_for_*`` methods return. Returns
        once no request is in flight any more (or after 2 s), so :attr:`in_flight` is 0 and
        every recorded request has its ``answered_at``. What was recorded stays readable.
        """
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            server, thread = self._server, self._thread
        self._faults.release_forever()  # later blackholes return at once, too
        self._arrivals.close()
        if server is not None:
            server.halt()
        if thread is not None:
            thread.join(timeout=5)
        self._arrivals.wait_idle(_STOP_WAIT_S)  # the handler threads end their requests

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = self.url if self._server is not None else "not started"
        events, requests = self._arrivals.counts()
        return f"<Collector {where} events={events} requests={requests}>"

    @property
    def port(self) -> int:
        """The bound port (raises RuntimeError before :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("Collector not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, the endpoint to give the SDK (after :meth:`start`)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- what arrived -------------------------------------------------------------------------

    def events(self) -> list[dict[str, Any]]:
        """Every accepted event, in arrival order (a new list; the dicts are the recorded ones)."""
        return self._arrivals.events()

    def message_ids(self) -> list[str]:
        """The ``messageId`` of every accepted event, in arrival order, re-sends included."""
        return [str(event["messageId"]) for event in self._arrivals.events()]

    def requests(self) -> list[RecordedRequest]:
        """Every request that reached the handler, rejected and faulted ones included.

        Each carries its timing (``started_at``, ``received_at``, ``answered_at``); a request
        whose answer is still held shows ``answered_at=None`` until it is answered.
        """
        return self._arrivals.requests()

    def wait_for_events(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` events were accepted; False after ``timeout`` seconds."""
        return self._arrivals.wait_for_events(n, timeout)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` requests were recorded; False after ``timeout`` seconds."""
        return self._arrivals.wait_for_requests(n, timeout)

    @property
    def in_flight(self) -> int:
        """How many ``POST /v1/batch`` requests are being handled at this moment.

        A request counts from the moment its headers are read until its answer is handed
        to the socket (or its connection reset), so it still counts while a ``slow`` fault,
        a delayed ``status`` fault or a black hole holds the answer, and no longer counts
        once its client has the answer. Thread-safe; never blocks.
        """
        return self._arrivals.in_flight

    @property
    def peak_in_flight(self) -> int:
        """The most ``POST /v1/batch`` requests handled at once (see :attr:`in_flight`).

        Since the collector was created or last :meth:`reset`; a reset restarts it from the
        requests still in flight. Thread-safe; never blocks.
        """
        return self._arrivals.peak_in_flight

    def wait_for_in_flight(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` batch requests are handled at once; False after
        ``timeout`` seconds (or at :meth:`stop`, unless it is true then)."""
        return self._arrivals.wait_for_in_flight(n, timeout)

    def connection_count(self) -> int:
        """How many TCP connections were accepted so far (to check keep-alive reuse)."""
        server = self._server
        return 0 if server is None else server.connection_count()

    def close_idle_connections(self) -> int:
        """Close every keep-alive connection not inside a request; return how many.

        Models a server or load balancer dropping idle connections: a client reusing one gets
        a stale-connection error. Best effort for a request arriving at that very moment.
        """
        server = self._server
        return 0 if server is None else server.close_idle()

    def reset(self) -> None:
        """Forget recorded events and requests and every fault; release black-holed requests.

        :attr:`peak_in_flight` restarts from the requests still in flight.
        """
        self._faults.clear()
        self._arrivals.clear()

    # -- fault injection ----------------------------------------------------------------------

    def respond(self, *faults: Fault) -> None:
        """Queue scripted faults: each next ``POST /v1/batch`` consumes one, in order."""
        self._faults.push(*faults)

    def set_mode(self, fault: Fault | None) -> None:
        """Apply ``fault`` to every request while no scripted fault is queued; None = normal.

        Releases black-holed requests unless the new mode is itself a blackhole.
        """
        self._faults.set_mode(fault)

    def set_random_faults(self, seed: int | None, rates: Mapping[str, float]) -> None:
        """Give each request (with no scripted fault queued) a fault drawn at random.

        ``rates`` maps a fault spec (``"500"``, ``"429"``, ``"reset_before_read"``,
        ``"slow:0.2"``; see :meth:`Fault.parse`) to its probability; they must sum to at most 1.
        One ``random.Random(seed).random()`` draw per request picks the fault, so the same seed
        and request order give the same faults (``RecordedRequest.fault`` says which one).
        ``seed=None`` uses the constructor's ``seed``, or a fresh one: see :attr:`random_seed`.
        Empty ``rates`` turns random faults off.
        """
        table = random_table(rates)
        if seed is None:
            seed = self.seed if self.seed is not None else random.SystemRandom().randrange(2**32)
        self._faults.set_random(seed, table)

    @property
    def random_seed(self) -> int | None:
        """The seed of the active random fault schedule (to replay a failing run), or None."""
        return self._faults.random_seed

    # -- internals ----------------------------------------------------------------------------

    def _authorized(self, header: str | None) -> bool:
        return authorized(header, self.write_key)

    def _control_key(self) -> str | None:
        return self.write_key
