"""The Client: validates input, builds events, hands them to its transport.

The Client knows neither WHEN events go (its :class:`~klime.transports.base.Transport`) nor
WHERE (the transport's :class:`~klime.senders.base.Sender`); a new runtime is a new transport
or integration, never a branch here.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import numbers
import os
import threading
from typing import Any, Dict, Mapping, Optional, Union

from . import _config, _events, _lifecycle
from ._aio import AsyncClientMixin
from ._deadline import check_timeout, seconds_or_no_limit
from ._delivery import Delivery, ErrorCallback, SuccessCallback
from ._logging import log, set_logger
from ._models import BatchResponse, FlushResult
from .errors import ConfigurationError, SendError
from .senders.base import Sender
from .transports._choice import make_sync_transport, make_transport
from .transports.base import Transport

__all__ = ["Client", "KlimeClient"]

_getpid = os.getpid

#: Seconds ``shutdown()`` waits when called without ``timeout`` (OpenTelemetry waits 30 s,
#: Sentry 2 s): long enough for a few round trips and a retry, short enough to fit in a
#: container's stop grace period (Docker's is 10 s) beside the app's own shutdown.
DEFAULT_SHUTDOWN_TIMEOUT = _config.DEFAULT_SHUTDOWN_TIMEOUT_S


def _number(name: str, value: Any, default: float, *, minimum: float, strict: bool = False) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigurationError(f"{name} must be a number, not {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigurationError(f"{name} must be a finite number")
    if number < minimum or (strict and number == minimum):
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise ConfigurationError(f"{name} must be {bound}, got {number:g}")
    return number


def _at_least(name: str, value: float, floor: float, why: str) -> float:
    """``value``, raised to ``floor`` (with one warning) when a tiny value would hurt."""
    if value >= floor:
        return value
    log.warning_once(
        f"floor-{name}",
        "klime: %s=%g ms is below %g ms (%s); using %g ms",
        name,
        value,
        floor,
        why,
        floor,
    )
    return floor


def _integer(name: str, value: Any, default: int, *, minimum: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigurationError(f"{name} must be an integer, not {type(value).__name__}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _spool_options(
    directory: Any, max_bytes: Any, retry_initial_delay_ms: float, destination: str, write_key: Optional[str]
) -> Optional[Dict[str, Any]]:
    """The spool transport's options from the Client's, checked; None without a spool.

    ``destination`` and ``write_key`` make the spool's project id (a fingerprint, never the
    key): only a process sending to the same place with the same key adopts the events a
    dead process left."""
    if directory is None:
        if max_bytes is not None:
            raise ConfigurationError("spool_max_bytes needs spool=DIRECTORY")
        return None
    if not isinstance(directory, (str, os.PathLike)) or not os.fspath(directory):
        raise ConfigurationError("spool must be a directory path")
    cap = _integer(
        "spool_max_bytes", max_bytes, _config.DEFAULT_SPOOL_MAX_BYTES, minimum=_config.MIN_SPOOL_BYTES
    )
    from .spool import project_id

    return {
        "directory": os.fspath(directory),
        "max_bytes": cap,
        "retry_initial_delay": retry_initial_delay_ms / 1000.0,
        "project": project_id(destination, write_key),
    }


def _callback(name: str, value: Any) -> Any:
    if value is not None and not callable(value):
        raise ConfigurationError(f"{name} must be callable or None, not {type(value).__name__}")
    return value


_logger_in_use: Optional[logging.Logger] = None


def _use_logger(logger: Any) -> None:
    """``Client(logger=)``: klime's records go to ``logger``. klime logs through one logger
    per process (as ``klime.configure(logger=)``), so a second client with another logger
    takes over from the first, and says so once."""
    global _logger_in_use
    if not callable(getattr(logger, "warning", None)):
        raise ConfigurationError(f"logger must be a logging.Logger, not {type(logger).__name__}")
    previous, _logger_in_use = _logger_in_use, logger
    set_logger(logger)
    if previous is not None and previous is not logger:
        log.warning_once(
            "second-logger",
            "klime: a second client was given another logger; klime logs through one logger "
            "per process, the latest one given",
        )


class Client(AsyncClientMixin):
    """A Klime client. Create one per process (or use the module-level functions).

    ``track``/``identify``/``group`` validate and encode the event on the caller's thread
    (microseconds, no I/O) and hand it to the transport; they raise
    :class:`~klime.ValidationError` on bad input and never raise for delivery problems,
    which go to ``on_error``. All methods are thread-safe. Interval, batch, queue and retry
    options use the Ruby SDK's names and milliseconds; ``timeout`` arguments are seconds.

    The first eleven parameters may be given by position, in klime 1.x's order
    (``KlimeClient`` is this class); the others are keyword-only.
    """

    def __init__(
        self,
        write_key: Optional[str] = None,
        endpoint: Optional[str] = None,
        flush_interval: Optional[float] = None,
        max_batch_size: Optional[int] = None,
        max_queue_size: Optional[int] = None,
        retry_max_attempts: Optional[int] = None,
        retry_initial_delay: Optional[float] = None,
        flush_on_shutdown: Optional[bool] = None,
        logger: Optional[logging.Logger] = None,
        on_error: Optional[ErrorCallback] = None,
        on_success: Optional[SuccessCallback] = None,
        *,
        transport: Union[str, Transport, None] = None,
        sender: Optional[Sender] = None,
        exit_timeout: Optional[float] = None,
        allow_insecure_endpoint: bool = False,
        max_concurrent_requests: Optional[int] = None,
        spool: Union[str, os.PathLike[str], None] = None,
        spool_max_bytes: Optional[int] = None,
    ) -> None:
        if write_key is None:
            write_key = _config.env(_config.ENV_WRITE_KEY)
        if sender is None:
            if not isinstance(write_key, str) or not write_key:
                if write_key is not None and not isinstance(write_key, str):
                    raise ConfigurationError(f"write_key must be a string, not {type(write_key).__name__}")
                raise ConfigurationError(
                    f"write_key is required: pass write_key= or set {_config.ENV_WRITE_KEY}"
                )
        elif not isinstance(sender, Sender):
            raise ConfigurationError(f"sender must be a klime Sender, not {type(sender).__name__}")
        self.endpoint = endpoint or _config.env(_config.ENV_ENDPOINT) or _config.DEFAULT_ENDPOINT
        self.flush_interval = _at_least(
            "flush_interval",
            _number(
                "flush_interval", flush_interval, _config.DEFAULT_FLUSH_INTERVAL_MS, minimum=0, strict=True
            ),
            _config.MIN_FLUSH_INTERVAL_MS,
            "an idle client would wake this often and burn CPU",
        )
        batch = _integer("max_batch_size", max_batch_size, _config.DEFAULT_MAX_BATCH_SIZE, minimum=1)
        if batch > _config.MAX_BATCH_EVENTS:
            log.warning_once(
                "max-batch-size-capped",
                "klime: max_batch_size=%d is above the server's limit; using %d",
                batch,
                _config.MAX_BATCH_EVENTS,
            )
            batch = _config.MAX_BATCH_EVENTS
        self.max_batch_size = batch
        self.max_queue_size = _integer(
            "max_queue_size", max_queue_size, _config.DEFAULT_MAX_QUEUE_SIZE, minimum=1
        )
        self.retry_max_attempts = _integer(
            "retry_max_attempts", retry_max_attempts, _config.DEFAULT_RETRY_MAX_ATTEMPTS, minimum=1
        )
        self.retry_initial_delay = _at_least(
            "retry_initial_delay",
            _number(
                "retry_initial_delay", retry_initial_delay, _config.DEFAULT_RETRY_INITIAL_DELAY_MS, minimum=0
            ),
            _config.MIN_RETRY_INITIAL_DELAY_MS,
            "a failing endpoint would get a storm of retries",
        )
        if flush_on_shutdown is not None and not isinstance(flush_on_shutdown, bool):
            raise ConfigurationError("flush_on_shutdown must be True or False")
        self.flush_on_shutdown = True if flush_on_shutdown is None else flush_on_shutdown
        self.max_concurrent_requests = _integer(
            "max_concurrent_requests",
            max_concurrent_requests,
            _config.DEFAULT_MAX_CONCURRENT_REQUESTS,
            minimum=1,
        )
        if self.max_concurrent_requests > _config.MAX_CONCURRENT_REQUESTS:
            raise ConfigurationError(
                f"max_concurrent_requests must be at most {_config.MAX_CONCURRENT_REQUESTS}, "
                f"got {self.max_concurrent_requests}"
            )
        spool_options = _spool_options(
            spool,
            spool_max_bytes,
            self.retry_initial_delay,
            self.endpoint if sender is None else f"sender:{sender!r}",
            write_key if sender is None else None,
        )
        # seconds; math.inf (or anything beyond a year) means "no limit"
        self.exit_timeout = (
            math.inf
            if isinstance(exit_timeout, numbers.Real) and not isinstance(exit_timeout, bool)
            and seconds_or_no_limit(float(exit_timeout)) is None
            else _number("exit_timeout", exit_timeout, _config.DEFAULT_EXIT_TIMEOUT_S, minimum=0)
        )
        self.on_error = _callback("on_error", on_error)
        self.on_success = _callback("on_success", on_success)
        if logger is not None:
            _use_logger(logger)

        if sender is None:
            from .senders.http import HttpSender

            sender = HttpSender(
                write_key or "",  # a missing key is refused there, with its message
                self.endpoint,
                retry_max_attempts=self.retry_max_attempts,
                retry_initial_delay=self.retry_initial_delay,
                allow_insecure_endpoint=allow_insecure_endpoint,
                pool_size=self.max_concurrent_requests,
            )
        self._sender = sender
        self._write_key = write_key if isinstance(write_key, str) else None
        self._delivery = Delivery(sender, on_error=self.on_error, on_success=self.on_success)
        self._transport = make_transport(
            transport,
            flush_interval=self.flush_interval,
            max_batch_size=self.max_batch_size,
            max_queue_size=self.max_queue_size,
            max_concurrent_requests=self.max_concurrent_requests,
            spool=spool_options,
        )
        self._transport.attach(self._delivery)
        self._sync = make_sync_transport(self._transport)
        self._sync.attach(self._delivery)
        self._closed = False
        self._close_lock = threading.Lock()
        self._pid = _getpid()
        _lifecycle.register(self)

    def __repr__(self) -> str:  # the write key never appears
        transport = self._transport.name or type(self._transport).__name__
        closed = " closed" if self._closed else ""
        return f"<klime.Client endpoint={self.endpoint!r} transport={transport!r}{closed}>"

    @property
    def transport(self) -> Transport:
        return self._transport

    @property
    def sender(self) -> Sender:
        return self._sender

    @property
    def write_key(self) -> Optional[str]:
        """The write key (klime 1.x's attribute; None with a custom ``sender=`` and no key).
        Read-only. It is a secret: klime never puts it in a repr, a log line or an error."""
        return self._write_key

    # ------------------------------------------------------------------ fork

    def _check_fork(self) -> None:
        """Reset per-process state if this is a forked child (idempotent, cheap)."""
        if self._pid != _getpid():
            self._restart()

    def _restart(self) -> None:
        """Start this process afresh: empty queue, fresh locks, connections and counters.

        What was queued before belongs to the process that queued it.
        """
        self._close_lock = threading.Lock()
        _events.reseed()
        self._delivery.after_fork()
        self._transport.after_fork()
        self._sync.after_fork()
        self._pid = _getpid()

    # ------------------------------------------------------------------ events

    def track(
        self,
        event: str,
        properties: Optional[Mapping[str, Any]] = None,
        user_id: Union[str, int, None] = None,
        group_id: Union[str, int, None] = None,
        *,
        timestamp: Optional[_dt.datetime] = None,
        message_id: Optional[str] = None,
    ) -> None:
        """Record that ``user_id`` (or the group ``group_id``) did ``event``.

        ``timestamp`` (a ``datetime``; naive means UTC) and ``message_id`` (a non-empty
        ``str``) replace the time of the call and a fresh id: for history and for events
        that must be sent exactly once by id. Non-blocking, thread-safe. Raises
        ValidationError on bad input (nothing queued).
        """
        if self._pid != _getpid():
            self._check_fork()
        raw = _events.encode_track(
            event, properties, user_id, group_id, timestamp=timestamp, message_id=message_id
        )
        if not self._transport.submit(raw):
            self._closed_call("track")

    def identify(
        self,
        user_id: Union[str, int],
        traits: Optional[Mapping[str, Any]] = None,
        *,
        timestamp: Optional[_dt.datetime] = None,
        message_id: Optional[str] = None,
    ) -> None:
        """Attach ``traits`` to the user ``user_id``. Non-blocking, thread-safe.
        ``timestamp``/``message_id``: as in :meth:`track`."""
        if self._pid != _getpid():
            self._check_fork()
        raw = _events.encode_identify(user_id, traits, timestamp=timestamp, message_id=message_id)
        if not self._transport.submit(raw):
            self._closed_call("identify")

    def group(
        self,
        group_id: Union[str, int],
        traits: Optional[Mapping[str, Any]] = None,
        user_id: Union[str, int, None] = None,
        *,
        timestamp: Optional[_dt.datetime] = None,
        message_id: Optional[str] = None,
    ) -> None:
        """Attach ``traits`` to the group ``group_id`` and link ``user_id`` to it.

        Non-blocking, thread-safe. ``timestamp``/``message_id``: as in :meth:`track`.
        """
        if self._pid != _getpid():
            self._check_fork()
        raw = _events.encode_group(group_id, traits, user_id, timestamp=timestamp, message_id=message_id)
        if not self._transport.submit(raw):
            self._closed_call("group")

    def _closed_call(self, method: str) -> None:
        log.warning_once(
            f"closed-{id(self)}",
            "klime: %s() called after shutdown(); the event was not recorded",
            method,
        )

    # ------------------------------------------------------------------ blocking sends

    def _send_now(self, raw: bytes, timeout: Optional[float]) -> BatchResponse:
        timeout = check_timeout(timeout)
        if self._pid != _getpid():
            self._check_fork()
        response = self._sync.send([raw], timeout)
        if response is None:
            raise SendError("the client is shut down; nothing was sent")
        return response

    def track_sync(
        self,
        event: str,
        properties: Optional[Mapping[str, Any]] = None,
        user_id: Union[str, int, None] = None,
        group_id: Union[str, int, None] = None,
        *,
        timestamp: Optional[_dt.datetime] = None,
        message_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Send one track event now, on this thread, with retries.

        Blocks up to ``timeout`` seconds (None: until retries run out). Returns the
        server's :class:`~klime.BatchResponse`; raises :class:`~klime.SendError` on any
        failure, a partial one included (``on_error`` is not called: the exception is
        the report; the server's answer is ``SendError.response``). Thread-safe.
        """
        raw = _events.encode_track(
            event, properties, user_id, group_id, timestamp=timestamp, message_id=message_id
        )
        return self._send_now(raw, timeout)

    def identify_sync(
        self,
        user_id: Union[str, int],
        traits: Optional[Mapping[str, Any]] = None,
        *,
        timestamp: Optional[_dt.datetime] = None,
        message_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Send one identify event now; see :meth:`track_sync`."""
        raw = _events.encode_identify(user_id, traits, timestamp=timestamp, message_id=message_id)
        return self._send_now(raw, timeout)

    def group_sync(
        self,
        group_id: Union[str, int],
        traits: Optional[Mapping[str, Any]] = None,
        user_id: Union[str, int, None] = None,
        *,
        timestamp: Optional[_dt.datetime] = None,
        message_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> BatchResponse:
        """Send one group event now; see :meth:`track_sync`."""
        raw = _events.encode_group(group_id, traits, user_id, timestamp=timestamp, message_id=message_id)
        return self._send_now(raw, timeout)

    # ------------------------------------------------------------------ flush / shutdown

    def flush(self, timeout: Optional[float] = None) -> FlushResult:
        """Block until every event recorded before the call is sent or reported to
        ``on_error``, or ``timeout`` seconds pass. Thread-safe. Returns the counts."""
        self._check_fork()
        return self._transport.flush(timeout)

    def shutdown(self, timeout: Optional[float] = None) -> FlushResult:
        """Flush (when ``flush_on_shutdown``) within ``timeout`` seconds, then stop.

        Blocks at most ``timeout`` seconds; None means the default bound,
        :data:`DEFAULT_SHUTDOWN_TIMEOUT` (5 s; ``math.inf`` waits without limit). Once the
        interpreter is exiting (an ``atexit`` handler of the app, such as klime 1.x's
        ``atexit.register(client.shutdown)``) the bound is ``exit_timeout`` at most, as for
        klime's own exit hook. Events not sent by then are reported to ``on_error``. Later
        calls of any method are no-ops (``*_sync`` raise SendError). Idempotent, thread-safe.
        """
        timeout = check_timeout(DEFAULT_SHUTDOWN_TIMEOUT if timeout is None else timeout)
        if _lifecycle.interpreter_exiting():
            timeout = self.exit_timeout if timeout is None else min(timeout, self.exit_timeout)
        self._check_fork()
        with self._close_lock:
            if self._closed:
                return FlushResult()
            self._closed = True
        _lifecycle.unregister(self)
        return self._close(timeout)

    def _close(self, timeout: Optional[float]) -> FlushResult:
        try:
            result = self._transport.shutdown(timeout, flush=self.flush_on_shutdown)
        finally:
            self._sync.shutdown(0)
            try:
                self._sender.close()
            except Exception:
                log.exception("klime: closing the sender failed")
        return result

    def _at_exit(self) -> None:
        """Process exit: shut down within ``exit_timeout``. Never raises."""
        try:
            self._check_fork()
            with self._close_lock:
                if self._closed:
                    return
                self._closed = True
            self._transport.at_exit(self.exit_timeout, self.flush_on_shutdown)
            self._sync.shutdown(0)
            self._sender.close()
        except Exception:
            log.exception("klime: flushing at exit failed")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ accounting

    def queue_size(self) -> int:
        """Events recorded and not resolved yet (waiting, or being sent): klime 1.x's
        ``queue_size()``, the ``queued`` of :meth:`stats`. Thread-safe, non-blocking."""
        return self.stats()["queued"]

    def stats(self) -> Dict[str, int]:
        """Counters of this process: ``tracked + adopted == sent + failed + dropped +
        queued`` holds whenever nothing is moving (``adopted``: events taken over from the
        spool of processes that are gone; ``spooled``: this process's events on disk, part
        of ``queued``; both 0 without a spool). Thread-safe, non-blocking."""
        self._check_fork()
        return self._delivery.ledger.stats()


#: klime 1.x's name for the client: the same class (``from klime import KlimeClient``).
KlimeClient = Client
