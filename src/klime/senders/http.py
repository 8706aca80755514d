"""The HTTP sender: Klime's wire protocol over a keep-alive urllib3 connection pool.

One request per :meth:`HttpSender.attempt`: ``POST {endpoint}/v1/batch`` with the batch's
encoded events, its outcome described in an :class:`~klime.senders.base.Attempt` value; the
retries are klime's one loop (:func:`~klime.senders.base.send_with_retries`, the policy of
:mod:`klime._retry`), which :meth:`HttpSender.send` runs.

The parts, top to bottom:

- **the endpoint** (checked at construction, with the standard library only): https, or a
  loopback host; never a control character; header values that can be sent;
- **one attempt, bounded in wall-clock time** (:class:`AttemptClock`): the pool's
  connections (their classes, :func:`bounded_pool_class`, also serve the SQS sender's
  boto3 client) cut every send and every receive to the least of the
  attempt's budget (connect + read timeout) and the caller's deadline, which another thread
  may tighten meanwhile, so that an attempt ends in time whatever the server does; a new
  connection's name look-up (``getaddrinfo``, a C call nothing can interrupt) runs on a
  short-lived thread (:class:`NameLookup`) that the attempt waits for no longer than its
  connect timeout cut to what is left, then the attempt is a connect timeout (an IP-literal
  host needs no thread, a kept-alive connection makes no look-up, TLS and ``Host`` keep
  the name; where no thread may run, :func:`set_lookup_thread_check`, the look-up stays
  unbounded on the attempt's thread); the TLS handshake is bounded by that cut connect
  timeout;
- **where requests go** (:func:`open_endpoint`): one connection pool for the endpoint,
  through the proxy the environment names, chosen as ``requests`` chooses it
  (:func:`proxy_for`), TLS verified against the bundle ``requests`` would use
  (:func:`ca_bundle`);
- **answers**: at most a small prefix of each answer is read, never inflated past a cap;
  server text quoted in errors has the write key masked;
- **request errors**: which no retry can fix, which mean a stale pooled connection, and a
  short, key-free description of each;
- **the sender** (:class:`HttpSender`).

The request goes to urllib3's pool directly: ``requests``' session, adapter and response
layers cost about a third of a loopback request's CPU time (``benchmarks/sender_cpu.py``:
0.71 times the CPU without them; docs/performance.md). ``requests`` still
decides which proxy the environment names, when it names one. The environment (proxies,
CA bundle) is read once per pool; a plain-http loopback endpoint never goes through a
proxy. ``urllib3`` is imported on the first send, inside functions, not before: importing
klime and building a client stays light.

May import: the model, the sender interface; ``urllib3``/``requests`` inside functions only.
"""

from __future__ import annotations

import functools
import io
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import warnings
import zlib
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Sequence, Tuple, Type
from urllib.parse import urlsplit

from .._batching import batch_body
from .._config import (
    BATCH_PATH,
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_MAX_CONCURRENT_REQUESTS,
    DEFAULT_READ_TIMEOUT_S,
    DEFAULT_RETRY_INITIAL_DELAY_MS,
    DEFAULT_RETRY_MAX_ATTEMPTS,
)
from .._deadline import Deadline
from .._logging import log as logger
from .._models import BatchResponse
from .._retry import RetryPolicy
from .._version import __version__
from ..errors import ConfigurationError, SendError, mask_secret, quote_body
from .base import OK, PARTIAL, REFUSED, RETRY, TOO_LARGE, Attempt, Sender, SendResult, send_with_retries

__all__ = ["HttpSender"]


USER_AGENT = f"klime-python/{__version__}"

_monotonic = time.monotonic

# ---------------------------------------------------------------------------------------
# the endpoint

#: Bytes of an answer read at most (more is never read: the connection is dropped instead),
#: and of a compressed answer inflated at most.
MAX_ANSWER_BYTES = 64 * 1024
#: A 2xx answer may list an error per event: this much more room per event of the batch.
ANSWER_BYTES_PER_EVENT = 2 * 1024

def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_http(url: str) -> bool:
    """True for a plain ``http://`` URL to a loopback host: it never goes through a proxy."""
    parts = urlsplit(url)
    return parts.scheme == "http" and _is_loopback(parts.hostname or "")


def validate_endpoint(endpoint: str, *, allow_insecure: bool = False) -> str:
    """Check ``endpoint`` and return it without surrounding blanks or a trailing slash.

    ``https://`` is required, except for a loopback host (``localhost``, ``127.0.0.0/8``,
    ``::1``) or when ``allow_insecure`` is True. A control character or a blank inside it
    is refused. Raises ConfigurationError.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError("endpoint must be a non-empty URL string")
    endpoint = endpoint.strip().rstrip("/")
    if any(ord(c) <= 0x20 or 0x7F <= ord(c) <= 0x9F for c in endpoint):
        raise ConfigurationError("endpoint contains a control character or a blank; check how it was read")
    try:
        parts = urlsplit(endpoint)
        host = parts.hostname
        _ = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise ConfigurationError(f"endpoint is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not host:
        raise ConfigurationError("endpoint must be an http(s) URL with a host, such as https://i.klime.com")
    if parts.username or parts.password:
        raise ConfigurationError("endpoint must not carry credentials; pass write_key instead")
    if parts.query or parts.fragment:
        raise ConfigurationError("endpoint must not have a query or fragment")
    if parts.scheme == "http" and not (allow_insecure or _is_loopback(host)):
        raise ConfigurationError(
            "endpoint uses plain http:// for a non-loopback host; the write key would travel "
            "unencrypted. Use https://, or pass allow_insecure_endpoint=True to accept the risk"
        )
    return endpoint


def header_safe(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value)


def short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------
# one attempt, bounded in wall-clock time


class AttemptClock:
    """The wall-clock bound of one HTTP attempt: its own budget (connect + read time) and
    the caller's deadline, which another thread may tighten meanwhile.

    Entered (``with attempt:``) on the thread that makes the request; the connections of
    :func:`new_session` read it before every send and every receive, so that an attempt
    ends by :meth:`left` whatever the server does (one byte every now and then included).
    """

    __slots__ = ("_ends", "_deadline")
    _current = threading.local()

    def __init__(self, budget: float, deadline: Deadline) -> None:
        self._ends = _monotonic() + max(0.0, budget)
        self._deadline = deadline

    def left(self) -> float:
        """Seconds left to this attempt (never negative). Thread-safe."""
        ends = self._ends
        at = self._deadline.at
        if at is not None and at < ends:
            ends = at
        return max(0.0, ends - _monotonic())

    def __enter__(self) -> AttemptClock:
        AttemptClock._current.attempt = self
        return self

    def __exit__(self, *exc: object) -> None:
        AttemptClock._current.attempt = None

    @classmethod
    def current(cls) -> Optional[AttemptClock]:
        """The attempt this thread is making, if any."""
        attempt: Optional[AttemptClock] = getattr(cls._current, "attempt", None)
        return attempt


class _BoundedReader(io.RawIOBase):
    """Reads a socket with each receive's timeout cut to what is left of the attempt."""

    def __init__(self, sock: socket.socket, attempt: AttemptClock) -> None:
        super().__init__()
        self._sock = sock
        # a SocketIO holds a reference: the socket outlives the connection's early close()
        self._raw = sock.makefile("rb", buffering=0)
        self._per_read = sock.gettimeout()
        self._attempt = attempt

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._raw.fileno()

    def readinto(self, buffer: Any) -> Optional[int]:
        left = self._attempt.left()
        if left <= 0:
            raise TimeoutError("the attempt ran out of time")
        self._sock.settimeout(left if self._per_read is None else min(self._per_read, left))
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


class _BoundedSocket:
    """What ``http.client.HTTPResponse`` sees of the socket: ``makefile`` only."""

    def __init__(self, sock: socket.socket, attempt: AttemptClock) -> None:
        self._sock = sock
        self._attempt = attempt

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        return io.BufferedReader(_BoundedReader(self._sock, self._attempt))


def _cut_to_attempt(timeout: object, attempt: Optional[AttemptClock]) -> Optional[float]:
    """A connection's ``timeout`` (a number, or None or urllib3's default for "none of its
    own") cut to what is left of ``attempt``; None when neither bounds it."""
    own = float(timeout) if isinstance(timeout, (int, float)) else None
    if attempt is None:
        return own
    left = attempt.left()
    return left if own is None else min(own, left)


# ---------------------------------------------------------------------------------------
# the name look-up of a new connection

#: What ``socket.getaddrinfo`` returns: (family, type, proto, canonical name, address).
AddressInfo = Tuple[socket.AddressFamily, socket.SocketKind, int, str, Any]

#: The name of the threads that look host names up (:class:`NameLookup`).
LOOKUP_THREAD_NAME = "klime-name-lookup"

#: Says whether a thread may be started now (see :func:`set_lookup_thread_check`).
_lookup_thread_check: Optional[Callable[[], bool]] = None


def set_lookup_thread_check(check: Optional[Callable[[], bool]]) -> None:
    """Register what says whether this process may start a thread now (False: a new
    connection's name look-up runs on the attempt's own thread, unbounded, as urllib3 does
    it). klime's uWSGI hooks register :func:`klime._runtime.background_threads_allowed`:
    without ``--enable-threads`` no Python thread runs, and a thread running in a uWSGI
    master when it forks can leave a worker hung. None: threads are always allowed (the
    default). Thread-safe (one assignment); non-blocking."""
    global _lookup_thread_check
    _lookup_thread_check = check


def name_to_look_up(host: str) -> Optional[str]:
    """``host`` as ``getaddrinfo`` takes it (IPv6 brackets off), or None for an IP literal,
    which needs no look-up. Cheap: a host ending in a letter is a name without parsing."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not name or name[-1].isalpha() or name[-1] == ".":
        return name
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return name
    return None


class NameLookup:
    """One ``socket.getaddrinfo`` call on a short-lived daemon thread (:data:`LOOKUP_THREAD_NAME`)
    that its caller waits for as long as it wishes: the C call itself cannot be interrupted.
    When the caller stops waiting, the thread is left to end on its own when the resolver
    answers or gives up; it holds nothing but its own result."""

    __slots__ = ("_done", "_addresses", "_error")

    def __init__(self, host: str, port: int, family: int) -> None:
        """Start the look-up. Raises RuntimeError when no thread can start (at interpreter
        shutdown). Non-blocking."""
        self._done = threading.Event()
        self._addresses: Sequence[AddressInfo] = ()
        self._error: Optional[BaseException] = None
        thread = threading.Thread(
            target=self._run, args=(host, port, family), name=LOOKUP_THREAD_NAME, daemon=True
        )
        thread.start()

    def _run(self, host: str, port: int, family: int) -> None:
        try:
            self._addresses = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the waiting caller, who raises it
            self._error = exc
        finally:
            self._done.set()

    def wait(self, timeout: Optional[float]) -> Optional[Sequence[AddressInfo]]:
        """The resolver's addresses, in its order; None when ``timeout`` seconds (None: no
        limit) passed first. Raises the resolver's error (``socket.gaierror``). Blocks;
        thread-safe."""
        if not self._done.wait(timeout):
            return None
        if self._error is not None:
            raise self._error
        return self._addresses


#: How often a name look-up's wait re-reads the attempt's clock: a deadline tightened
#: meanwhile (a shutdown) ends the wait this soon.
LOOKUP_CLOCK_CHECK_S = 0.1


def _look_up(
    name: str, port: int, family: int, timeout: Optional[float], attempt: Optional[AttemptClock]
) -> Optional[Sequence[AddressInfo]]:
    """The addresses of ``name`` from a :class:`NameLookup`, waited for no longer than
    ``timeout`` seconds (None: no bound of its own) cut to what is left of ``attempt``,
    whose clock is re-read every :data:`LOOKUP_CLOCK_CHECK_S`; None when the time ran out
    first. On the calling thread, unbounded, when no thread can start (interpreter
    shutdown). Raises the resolver's error. Blocks."""
    ends = None if timeout is None else _monotonic() + timeout
    try:
        lookup = NameLookup(name, port, family)
    except RuntimeError:
        return socket.getaddrinfo(name, port, family, socket.SOCK_STREAM)
    while True:
        left = _cut_to_attempt(None if ends is None else ends - _monotonic(), attempt)
        if left is not None and left <= 0:
            return None
        step = left if attempt is None or left is None else min(left, LOOKUP_CLOCK_CHECK_S)
        addresses = lookup.wait(step)
        if addresses is not None:
            return addresses


def _connect_first(
    addresses: Sequence[AddressInfo],
    attempt: Optional[AttemptClock],
    timeout: object,
    source_address: Optional[Tuple[str, int]],
    socket_options: Optional[Sequence[Tuple[int, int, Any]]],
) -> socket.socket:
    """A socket connected to the first of ``addresses`` that accepts, tried in the
    resolver's order, each within ``timeout`` cut to what is left of ``attempt``; bound to
    ``source_address`` and given ``socket_options`` first. Raises the last OSError
    (TimeoutError when time ran out). Blocks."""
    failure: Optional[OSError] = None
    for family, kind, proto, _, address in addresses:
        limit = _cut_to_attempt(timeout, attempt)
        if limit is not None and limit <= 0:
            raise TimeoutError("the attempt ran out of time")
        sock: Optional[socket.socket] = None
        try:
            sock = socket.socket(family, kind, proto)
            for option in socket_options or ():
                sock.setsockopt(*option)
            if limit is not None:
                sock.settimeout(limit)
            if source_address:
                sock.bind(source_address)
            sock.connect(address)
            return sock
        except OSError as exc:
            if sock is not None:
                sock.close()
            failure = exc
    raise failure if failure is not None else OSError("the name has no address")


def _error_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps (arguments, ``reason``), as far as 16 deep."""
    pending = [exc]
    seen = 0
    while pending and seen < 16:
        item = pending.pop()
        seen += 1
        yield item
        pending.extend(a for a in getattr(item, "args", ()) if isinstance(a, BaseException))
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)


@functools.cache
def _name_lookup_timeout_error() -> Type[Exception]:
    """urllib3's connect-timeout error for a name look-up that did not answer in time,
    carrying the description :func:`describe_exception` reports. Imports ``urllib3``."""
    from urllib3.exceptions import ConnectTimeoutError

    class NameLookupTimeoutError(ConnectTimeoutError):
        """The resolver did not answer within the time the attempt could give it."""

        def __init__(self, conn: Any, description: str) -> None:
            super().__init__(conn, description)
            self.lookup_description = description  # what describe_exception reports

    return NameLookupTimeoutError


def _open_socket(conn: Any) -> Optional[socket.socket]:
    """The socket of the new urllib3 connection ``conn``, its host name looked up on a
    :class:`NameLookup` thread for no longer than its connect timeout cut to what is left
    of the attempt, then connected as urllib3 would (see :func:`_connect_first`); None when
    there is nothing to bound (an IP-literal host; neither a timeout nor an attempt; no
    thread allowed here), and urllib3 then connects as it always does. ``conn.host`` is
    never changed: TLS checks the name, ``Host`` stays the name. Raises urllib3's connect
    errors. Blocks."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
    from urllib3.util.connection import allowed_gai_family

    name = name_to_look_up(conn._dns_host)
    check = _lookup_thread_check
    if name is None or (check is not None and not check()):
        return None
    attempt = AttemptClock.current()
    own = float(conn.timeout) if isinstance(conn.timeout, (int, float)) else None
    if own is None and attempt is None:
        return None
    started = _monotonic()
    try:
        addresses = _look_up(name, conn.port, allowed_gai_family(), own, attempt)
        if addresses is not None:
            options = conn.socket_options
            sock = _connect_first(addresses, attempt, conn.timeout, conn.source_address, options)
            sys.audit("http.client.connect", conn, conn.host, conn.port)  # as http.client does
            return sock
    except TimeoutError as exc:
        raise ConnectTimeoutError(conn, f"connecting to {name} timed out ({exc})") from exc
    except (OSError, UnicodeError) as exc:
        raise NewConnectionError(conn, f"could not connect to {name}: {exc}") from exc
    waited = _monotonic() - started
    description = f"the name look-up of {name} did not answer within {waited:.1f} s"
    raise _name_lookup_timeout_error()(conn, description)


@functools.cache
def _bounded_response_class() -> Type[Any]:
    """An ``http.client.HTTPResponse`` that reads its socket through :class:`_BoundedSocket`
    while an :class:`AttemptClock` is entered on the thread that makes it."""
    import http.client

    class BoundedResponse(http.client.HTTPResponse):
        def __init__(self, sock: Any, *args: Any, **kwargs: Any) -> None:
            attempt = AttemptClock.current()
            wrapped: Any = sock if attempt is None else _BoundedSocket(sock, attempt)
            super().__init__(wrapped, *args, **kwargs)

    return BoundedResponse


def _cut_send_timeout(conn: Any) -> None:
    """Cut the send timeout of ``conn`` (its connect timeout) to what is left of the attempt."""
    attempt = AttemptClock.current()
    if attempt is not None and conn.sock is not None:
        left = attempt.left()
        if left <= 0:
            raise TimeoutError("the attempt ran out of time")
        timeout = conn.timeout
        conn.sock.settimeout(min(timeout, left) if isinstance(timeout, (int, float)) else left)


@functools.cache
def bounded_connection_class(base: Type[Any]) -> Type[Any]:
    """A subclass of the urllib3 connection class ``base`` (``HTTPConnection``,
    ``HTTPSConnection``, or a subclass of either, such as botocore's) whose every send and
    receive is cut to what is left of the :class:`AttemptClock` entered on the calling
    thread, and whose new connections look their host name up on a bounded
    :class:`NameLookup`. Without an entered clock it behaves as ``base`` but for that
    look-up, bounded by its connect timeout. One class per ``base``, built on first use.
    Thread-safe."""

    class BoundedConnection(base):  # type: ignore[misc]
        response_class = _bounded_response_class()

        def _new_conn(self) -> socket.socket:
            sock = _open_socket(self)
            return sock if sock is not None else super()._new_conn()

        def send(self, data: Any) -> None:
            _cut_send_timeout(self)
            super().send(data)

    BoundedConnection.__name__ = BoundedConnection.__qualname__ = f"Bounded{base.__name__}"
    return BoundedConnection


@functools.cache
def bounded_pool_class(base: Type[Any]) -> Type[Any]:
    """A subclass of the urllib3 connection pool class ``base`` whose connections are
    :func:`bounded_connection_class` of its own. One class per ``base``; thread-safe."""
    connection = bounded_connection_class(base.ConnectionCls)
    return type(f"Bounded{base.__name__}", (base,), {"ConnectionCls": connection, "__module__": __name__})


class EndpointPool(NamedTuple):
    """Where an :class:`HttpSender`'s requests go: the urllib3 connection pool that reaches
    the endpoint (directly, or through a proxy), the pool manager that owns it, and the
    request target to name (the path; the whole URL through a plain-http forward proxy)."""

    manager: Any
    pool: Any
    target: str


def proxy_for(url: str) -> Optional[str]:
    """The proxy URL the environment names for ``url``, as ``requests`` chooses it
    (``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` and ``NO_PROXY``, any case, and the
    system's settings where ``urllib.request.getproxies`` reads them), or None. A plain-http
    loopback ``url`` never goes through a proxy: the key would travel in clear to it.
    Imports ``requests`` only when the environment names a proxy for the scheme."""
    if is_loopback_http(url):
        return None
    from urllib.request import getproxies

    scheme = urlsplit(url).scheme
    named = getproxies()
    if not (named.get(scheme) or named.get("all")):
        return None
    from requests.utils import get_environ_proxies, prepend_scheme_if_needed, select_proxy

    proxy = select_proxy(url, get_environ_proxies(url))
    return prepend_scheme_if_needed(proxy, "http") if proxy else None  # type: ignore[no-untyped-call]


def ca_bundle() -> Optional[str]:
    """The certificates an https endpoint's must chain to, as ``requests`` picks them:
    ``REQUESTS_CA_BUNDLE`` or ``CURL_CA_BUNDLE`` when set and not empty, otherwise
    ``certifi``'s bundle (``requests``' own dependency, for this very bundle); a file, or a
    directory of hashed certificates. None, the system's store, only where certifi is
    missing."""
    chosen = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
    if chosen:
        return chosen
    try:
        import certifi
    except ImportError:
        return None
    where: str = certifi.where()
    if not os.path.exists(where):  # certifi inside a zip (a zipapp): requests extracts it
        from requests.utils import extract_zipped_paths

        where = extract_zipped_paths(where)  # type: ignore[no-untyped-call]
    return where


def _tls_context(bundle: Optional[str]) -> Any:
    """An SSL context that verifies certificates against ``bundle`` (None: the system's
    store) and lets urllib3 check the host name; built once per pool (loading a bundle
    costs milliseconds)."""
    import ssl

    from urllib3.util.ssl_ import create_urllib3_context

    context = create_urllib3_context(cert_reqs=ssl.CERT_REQUIRED)
    if bundle is None:
        context.load_default_certs()
    elif os.path.isdir(bundle):
        context.load_verify_locations(capath=bundle)
    else:
        context.load_verify_locations(cafile=bundle)
    return context


def open_endpoint(url: str, pool_size: int) -> EndpointPool:
    """The connection pool for ``url`` (keep-alive, at most ``pool_size`` connections, all
    of them bounded by :class:`AttemptClock`), through the proxy the environment names
    (:func:`proxy_for`), verifying TLS against :func:`ca_bundle`. The environment is read
    here, once. Raises ConfigurationError for a proxy that cannot be used (an unknown
    scheme; SOCKS without PySocks) or CA certificates that cannot be loaded. Imports
    ``urllib3``."""
    from urllib3.exceptions import HTTPError

    parts = urlsplit(url)
    settings: Dict[str, Any] = {"num_pools": 1, "maxsize": pool_size, "block": False, "retries": False}
    if parts.scheme == "https":
        bundle = ca_bundle()
        try:
            context = _tls_context(bundle)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            where = "the system's" if bundle is None else f"{bundle!r}"
            raise ConfigurationError(
                f"the CA certificates ({where}) cannot be loaded: {type(exc).__name__}"
            ) from None
        settings.update(cert_reqs="CERT_REQUIRED", ssl_context=context)
    proxy = proxy_for(url)
    try:
        manager = _pool_manager(proxy, settings)
        pool = manager.connection_from_url(url)
    except ConfigurationError:
        raise
    except (HTTPError, AssertionError, ValueError) as exc:  # an unknown proxy scheme is all three
        raise ConfigurationError(f"the proxy cannot be used ({type(exc).__name__})") from None
    # through a plain-http forward proxy the request line names the whole URL (as requests does)
    forwarded = proxy is not None and not _is_socks(proxy) and parts.scheme == "http"
    return EndpointPool(manager, pool, url if forwarded else (parts.path or "/"))


def _is_socks(proxy: str) -> bool:
    return proxy.lower().startswith("socks")


def _pool_manager(proxy: Optional[str], settings: Dict[str, Any]) -> Any:
    """A urllib3 pool manager with ``settings``, direct or through ``proxy`` (its user and
    password, if any, sent as ``requests`` sends them), whose pools' connections are
    bounded by :class:`AttemptClock` (SOCKS ones keep their own classes)."""
    from urllib3 import PoolManager, ProxyManager
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.util import make_headers

    if proxy is None:
        manager: Any = PoolManager(**settings)
    else:
        from requests.utils import get_auth_from_url

        user, password = get_auth_from_url(proxy)
        if _is_socks(proxy):
            try:
                with warnings.catch_warnings():  # urllib3 warns, then raises ImportError
                    warnings.simplefilter("ignore")
                    from urllib3.contrib.socks import SOCKSProxyManager
            except ImportError:
                raise ConfigurationError("a SOCKS proxy needs PySocks (pip install PySocks)") from None
            return SOCKSProxyManager(proxy, username=user or None, password=password or None, **settings)
        auth = make_headers(proxy_basic_auth=f"{user}:{password}") if user else {}
        manager = ProxyManager(proxy, proxy_headers=auth, **settings)
    manager.pool_classes_by_scheme = {
        "http": bounded_pool_class(HTTPConnectionPool),
        "https": bounded_pool_class(HTTPSConnectionPool),
    }
    return manager


# ---------------------------------------------------------------------------------------
# answers


def read_answer(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of the body of ``response`` (a urllib3 response made with
    ``preload_content=False``), as sent (never inflated). A longer body is cut there and its
    connection dropped; a whole one frees the connection for the next request. Blocks
    (bounded by the :class:`AttemptClock`); raises TimeoutError when time ran out and
    urllib3's ``ProtocolError`` when the answer broke off or was malformed."""
    from urllib3.exceptions import HTTPError, ProtocolError, ReadTimeoutError

    body = bytearray()
    try:
        while len(body) <= limit:
            chunk = response.read(min(16384, limit + 1 - len(body)), decode_content=False)
            if not chunk:
                response.release_conn()
                return bytes(body)
            body += chunk
            if response.length_remaining == 0 and len(body) <= limit:
                response.release_conn()  # the whole body its Content-Length announced: no read for its end
                return bytes(body)
    except (TimeoutError, ReadTimeoutError) as exc:
        _drop(response)
        raise TimeoutError(f"reading the answer timed out ({exc})") from None
    except (HTTPError, OSError, ValueError) as exc:
        _drop(response)
        raise ProtocolError("the answer broke off", exc) from None
    _drop(response)  # more than we read: drop the connection rather than drain it
    return bytes(body[:limit])


def _drop(response: Any) -> None:
    """Close the connection of ``response`` and give the pool its place back (the next
    request opens a new connection there)."""
    response.close()
    response.release_conn()


def _inflate(body: bytes, encoding: str, limit: int) -> Optional[bytes]:
    """``body`` decoded per ``Content-Encoding``, at most ``limit`` bytes; None if unknown."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None
    try:
        wbits = 47 if encoding != "deflate" else (15 if body[:1] == b"\x78" else -15)
        return zlib.decompressobj(wbits).decompress(body, limit)
    except zlib.error:
        return None


def parse_json(body: bytes, encoding: str = "", limit: int = MAX_ANSWER_BYTES) -> Any:
    """The JSON value of an answer's body (inflated to ``limit`` bytes at most), or None
    when there is no usable one (empty, unknown encoding, malformed, cut, or nested too
    deeply to parse)."""
    data = _inflate(body, encoding, limit) if body else None
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def quote_answer(body: bytes, encoding: str, secret: str) -> str:
    """A short, key-free excerpt of an error answer: its JSON ``message``, or its text."""
    payload = parse_json(body, encoding)
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return quote_body(payload["message"], secret=secret)
    data = _inflate(body, encoding, MAX_ANSWER_BYTES)
    return quote_body(data, secret=secret) if data is not None else ""


# ---------------------------------------------------------------------------------------
# request errors


@functools.cache
def permanent_request_errors() -> Tuple[Type[BaseException], ...]:
    """Errors of making a request that no retry can fix: a URL or a header value urllib3 or
    ``http.client`` refuses (a ValueError), or a header urllib3 cannot read. Imports
    ``urllib3``."""
    from urllib3.exceptions import InvalidHeader, LocationValueError

    return (LocationValueError, InvalidHeader, ValueError)


@functools.cache
def transient_request_errors() -> Tuple[Type[BaseException], ...]:
    """Errors of a request that a later attempt may not meet: every urllib3 error (connect,
    TLS, proxy, time-outs, a broken answer), a socket's and ``http.client``'s. Imports
    ``urllib3``."""
    import http.client

    from urllib3.exceptions import HTTPError

    return (HTTPError, OSError, http.client.HTTPException)


def is_timeout(exc: BaseException) -> bool:
    """A time-out, at any step (connect, send, receive), however it was wrapped."""
    return any(
        isinstance(item, TimeoutError) or type(item).__name__.endswith("TimeoutError")
        for item in _error_chain(exc)
    )


def is_stale_connection(exc: BaseException) -> bool:
    """A pooled connection the peer closed (e.g. during a Lambda freeze): retry at once."""
    if is_timeout(exc):
        return False
    text = repr(exc)
    return "Connection aborted" in text or "RemoteDisconnected" in text or "ConnectionResetError" in text


def describe_exception(exc: BaseException) -> str:
    """A short, key-free description of a request error (the host name may appear).
    Imports ``urllib3``."""
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProxyError, SSLError

    for item in _error_chain(exc):
        lookup = getattr(item, "lookup_description", None)
        if isinstance(lookup, str):
            return lookup
    if isinstance(exc, ConnectTimeoutError) and not isinstance(exc, NewConnectionError):
        return "connection timed out"
    if isinstance(exc, SSLError):
        return "TLS error"
    if is_timeout(exc):
        return "read timed out"
    if isinstance(exc, ProxyError):
        return "proxy error"
    text = str(exc)
    if "Connection refused" in text:
        return "connection refused"
    if "Connection aborted" in text or "reset" in text.lower():
        return "connection reset"
    return "connection error"


# ---------------------------------------------------------------------------------------
# the sender


class HttpSender(Sender):
    """POSTs batches to ``{endpoint}/v1/batch``, retrying transient failures.

    Thread-safe: one keep-alive connection pool of ``pool_size`` (opened on first use)
    serves every thread; in a forked child :meth:`after_fork` replaces it, so a child never
    writes to its parent's sockets. :meth:`attempt` makes one request; :meth:`send` retries
    (see :class:`~klime._retry.RetryPolicy`) and stops at the caller's deadline.
    """

    def __init__(
        self,
        write_key: str,
        endpoint: str,
        *,
        retry_max_attempts: int = DEFAULT_RETRY_MAX_ATTEMPTS,
        retry_initial_delay: float = DEFAULT_RETRY_INITIAL_DELAY_MS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout: float = DEFAULT_READ_TIMEOUT_S,
        pool_size: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
        allow_insecure_endpoint: bool = False,
        retry_policy: Optional[RetryPolicy] = None,
    ) -> None:
        """``retry_initial_delay`` is in milliseconds (Ruby SDK parity); timeouts in seconds."""
        if not isinstance(write_key, str) or not write_key:
            raise ConfigurationError("write_key is required")
        if not header_safe(write_key):
            raise ConfigurationError(
                "write_key contains characters that cannot be sent in an HTTP header "
                "(a line break, a control character or a non-Latin-1 letter); check how it was read"
            )
        self._endpoint = validate_endpoint(endpoint, allow_insecure=allow_insecure_endpoint)
        self.url = self._endpoint + BATCH_PATH
        self.retry = retry_policy or RetryPolicy(retry_max_attempts, retry_initial_delay / 1000.0)
        self.retry_policy = self.retry
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self._pool_size = max(1, int(pool_size))
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Accept-Encoding": "identity",  # an answer is never inflated (see read_answer)
            "Authorization": f"Bearer {write_key}",
            "User-Agent": USER_AGENT,
        }
        self._secret = write_key  # masked in any server text quoted back
        self._lock = threading.Lock()
        self._opened: Optional[EndpointPool] = None

    def __repr__(self) -> str:  # never shows the write key
        return f"HttpSender(url={self.url!r})"

    def _pool(self) -> EndpointPool:
        """Where the requests go (:class:`EndpointPool`): made on first use, when ``urllib3``
        is imported and the environment read (proxy variables, ``REQUESTS_CA_BUNDLE``),
        once. Raises ConfigurationError for a proxy that cannot be used. Thread-safe."""
        endpoint = self._opened
        if endpoint is None:
            with self._lock:  # one import of the HTTP stack at a time: two at once can fail
                endpoint = self._opened
                if endpoint is None:
                    endpoint = self._opened = open_endpoint(self.url, self._pool_size)
        return endpoint

    def prepare(self) -> None:
        """Initialise OpenSSL (``import ssl, hashlib``: a few milliseconds) on the calling
        thread; ``urllib3`` itself is imported at the first send, by whichever thread
        sends (a sender thread, off the caller's path). Transports of long-running
        processes call it when the client is made: OpenSSL initialised for the first time
        from a sender thread of a forked uWSGI worker was seen to crash the worker
        (``--lazy-apps --shared-import klime``). Blocks briefly; idempotent; thread-safe."""
        import hashlib  # noqa: F401  (OpenSSL's digests)
        import ssl  # noqa: F401  (OpenSSL itself)

    def after_fork(self) -> None:
        # The inherited sockets belong to the parent: forget them without closing them.
        self._lock = threading.Lock()
        self._opened = None

    def close(self) -> None:
        with self._lock:
            endpoint, self._opened = self._opened, None
        if endpoint is not None:
            endpoint.manager.clear()

    # ---------------------------------------------------------------------------------

    def send(self, events: Sequence[bytes], deadline: Deadline) -> SendResult:
        """POST one batch, retrying transient failures until attempts or deadline run out
        (klime's one retry loop, :func:`~klime.senders.base.send_with_retries`, over
        :meth:`attempt`). Blocks; thread-safe; never raises. Every retry sends the same bytes.
        """
        return send_with_retries(self, events, deadline)

    def attempt(self, events: Sequence[bytes], deadline: Deadline) -> Attempt:
        """POST one batch once and describe the outcome. Never retries; never raises.

        Blocks for one request: it ends by the least of ``connect_timeout + read_timeout``
        and ``deadline``, in wall-clock time, whatever the server or the resolver does (a
        name look-up counts as connect time; ``cut_short`` when the deadline ended it).
        Thread-safe.
        """
        count = len(events)
        all_failed = tuple(range(count))
        try:
            # before the attempt's clocks start: the first one imports urllib3 (tens of ms
            # of CPU time) that the concurrency limit must not take for a request's cost
            endpoint = self._pool()
        except ConfigurationError as exc:
            reason = f"request could not be made: {exc}"
            logger.error("klime: batch of %d events not sent: %s", count, reason)
            return Attempt(REFUSED, error=SendError(reason), failed=all_failed, made=False)
        from urllib3 import Timeout

        connect_t = deadline.cap(self.connect_timeout)
        read_t = deadline.cap(self.read_timeout)
        started, cpu_started = _monotonic(), time.thread_time()
        if connect_t <= 0 or read_t <= 0:
            return Attempt(RETRY, reason="deadline reached", cut_short=True, made=False)
        try:
            with AttemptClock(self.connect_timeout + self.read_timeout, deadline):
                response = endpoint.pool.urlopen(
                    "POST",
                    endpoint.target,
                    body=batch_body(events),
                    headers=self._headers,
                    retries=False,
                    redirect=False,
                    assert_same_host=False,
                    preload_content=False,
                    timeout=Timeout(connect=connect_t, read=read_t),
                )
                code = response.status
                wanted = MAX_ANSWER_BYTES + (ANSWER_BYTES_PER_EVENT * count if 200 <= code < 300 else 0)
                answer = read_answer(response, wanted)
            headers = response.headers
        except permanent_request_errors() as exc:
            # only the type: a ValueError's text may quote a header value, the key
            reason = f"request could not be made: {type(exc).__name__}"
            logger.error("klime: batch of %d events not sent: %s", count, reason)
            return Attempt(REFUSED, error=SendError(reason), failed=all_failed, made=False,
                           duration=_monotonic() - started, cpu=time.thread_time() - cpu_started)
        except transient_request_errors() as exc:
            took = _monotonic() - started
            cut_short = _out_of_time(deadline)
            return Attempt(
                RETRY,
                reason=describe_exception(exc),
                stale=not cut_short and is_stale_connection(exc),
                cut_short=cut_short,
                duration=took,
                cpu=time.thread_time() - cpu_started,
            )
        return answer_outcome(
            code,
            answer,
            encoding=headers.get("Content-Encoding") or "",
            retry_after=headers.get("Retry-After"),
            count=count,
            limit=wanted,
            policy=self.retry,
            secret=self._secret,
            took=_monotonic() - started,
            cpu=time.thread_time() - cpu_started,
        )


def answer_outcome(
    status: int,
    body: bytes,
    *,
    encoding: str,
    retry_after: Optional[str],
    count: int,
    limit: int,
    policy: RetryPolicy,
    secret: str,
    took: float,
    cpu: Optional[float] = None,
) -> Attempt:
    """What an answer of Klime's API (``status``, the first ``limit`` bytes of its ``body``
    as sent, its ``Content-Encoding`` and ``Retry-After``) means for a batch of ``count``
    events: the one reading of an answer, shared by :class:`HttpSender` and
    :class:`klime.testing.MockSender`. A 2xx is accepted unless its body names rejected
    events; 413 is ``too_large``; 408, 429 and 5xx are transient (``retry``, with the
    server's ``Retry-After`` in seconds); any other status is refused for good. Quoted
    server text has ``secret`` masked. Pure; never raises."""
    all_failed = tuple(range(count))
    if 200 <= status < 300:
        return _accepted(parse_json(body, encoding, limit), status, count, took, secret, cpu)
    text = quote_answer(body, encoding, secret)
    reason = f"HTTP {status}" + (f": {text}" if text else "")
    if status == 413:
        error = SendError(f"batch rejected as too large ({reason})", status)
        return Attempt(TOO_LARGE, status=status, error=error, failed=all_failed, reason=reason, duration=took,
                       cpu=cpu)
    if not policy.is_transient_status(status):
        logger.error("klime: batch of %d events rejected: %s", count, reason)
        error = SendError(f"batch rejected: {reason}", status)
        return Attempt(REFUSED, status=status, error=error, failed=all_failed, reason=reason, duration=took,
                       cpu=cpu)
    wait = policy.retry_after(retry_after)
    return Attempt(RETRY, status=status, reason=reason, retry_after=wait, duration=took, cpu=cpu)


def _accepted(
    payload: Any, status: int, count: int, took: float, secret: str, cpu: Optional[float]
) -> Attempt:
    """A 2xx: all accepted, unless the body (parsed JSON, or None) names rejected events."""
    try:
        parsed = BatchResponse.from_body(payload, count, status)
    except (ValueError, TypeError, RecursionError):  # no usable body: the status decides
        parsed = BatchResponse.from_body(None, count, status)
    if not parsed.failed:
        return Attempt(OK, status=status, response=parsed, duration=took, cpu=cpu)
    failed = tuple(sorted({e.index for e in parsed.errors}))
    summary = "; ".join(
        f"#{e.index}: {short(mask_secret(e.message, secret))}"
        + (f" ({short(mask_secret(e.code, secret), 40)})" if e.code else "")
        for e in parsed.errors[:5]
    )
    if len(parsed.errors) > 5:
        summary += f"; and {len(parsed.errors) - 5} more"
    logger.warning("klime: %d of %d events of a batch were rejected: %s", parsed.failed, count, summary)
    error = SendError(f"{parsed.failed} of {count} events rejected: {summary}", status, response=parsed)
    return Attempt(PARTIAL, status=status, response=parsed, error=error, failed=failed, duration=took,
                   cpu=cpu)


def _out_of_time(deadline: Deadline) -> bool:
    """The caller's deadline has passed (a time-out ending then was the deadline's doing)."""
    left = deadline.remaining()
    return left is not None and left < 0.001
