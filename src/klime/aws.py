"""klime on AWS: the write key from SSM Parameter Store or Secrets Manager.

::

    import klime
    from klime.aws import write_key_from_ssm

    client = klime.Client(write_key_from_ssm("/prod/klime/write-key"))

The AWS pieces of klime (this module, :class:`klime.senders.sqs.SqsSender` and the SQS
forwarder in ``klime.integrations.lambda``) need boto3, the optional extra
``pip install "klime[aws]"``. boto3 is imported on first use, never by ``import klime``;
without it every AWS entry point raises :class:`MissingDependencyError`, whose message says
what to install.

A write key is fetched once per process (a Lambda cold start, a worker's start) and cached:
later calls with the same arguments return the cached value without a request. Failures
are never cached. A look-up is bounded in wall-clock time as a whole (``timeout``, 10 s by
default: a Lambda's whole Init phase has 10 s), whatever the endpoint does, a server that
answers one byte at a time included: it runs on a short-lived thread of klime's that the
caller waits for; where no thread may run (uWSGI without threads) it runs on the caller's
thread, bounded by botocore's per-read timeouts only. Every failure is a
:class:`~klime.ConfigurationError` that names the parameter or secret and the cause (not
found, access denied, no credentials, no region, no answer in time); the key itself never
appears in a message or a log line, botocore's included: its DEBUG records of klime's own
look-up (which hold the response body) are dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from typing import Any, Callable, Dict, FrozenSet, Iterator, Optional, Set, Tuple

from ._boto import INSTALL_HINT, MissingDependencyError, client_error_info, require_boto3
from ._deadline import check_timeout
from ._logging import log
from .errors import ConfigurationError

__all__ = [
    "INSTALL_HINT",
    "MissingDependencyError",
    "clear_write_key_cache",
    "require_boto3",
    "write_key_from_secret",
    "write_key_from_ssm",
]

#: Socket timeouts (seconds) and attempts for the one-off key look-ups (each socket
#: timeout is cut to the look-up's ``timeout``).
_LOOKUP_CONNECT_TIMEOUT_S = 5.0
_LOOKUP_READ_TIMEOUT_S = 10.0
_LOOKUP_MAX_ATTEMPTS = 3
#: Default wall-clock bound of one look-up, seconds: all of a Lambda's Init phase.
DEFAULT_LOOKUP_TIMEOUT_S = 10.0


_DENIED_CODES = frozenset(
    {
        "AccessDenied",
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "ExpiredTokenException",
        "ExpiredToken",
        "SignatureDoesNotMatch",
        "DecryptionFailure",
        "KMSAccessDeniedException",
    }
)
_MISSING_CODES = frozenset({"ParameterNotFound", "ParameterVersionNotFound", "ResourceNotFoundException"})


def _region_from_arn(name: str) -> Optional[str]:
    # arn:aws:ssm:eu-west-1:123456789012:parameter/x  /  arn:aws:secretsmanager:...:secret:x
    parts = name.split(":")
    if len(parts) >= 6 and parts[0] == "arn" and parts[3]:
        return parts[3]
    return None


def _make_client(
    service: str,
    region: Optional[str],
    what: str,
    timeout: Optional[float],
    endpoint_url: Optional[str] = None,
) -> Any:
    boto3 = require_boto3(what)
    from botocore.config import Config

    def cut(seconds: float) -> float:
        return seconds if timeout is None else max(0.1, min(seconds, timeout))

    config = Config(
        connect_timeout=cut(_LOOKUP_CONNECT_TIMEOUT_S),
        read_timeout=cut(_LOOKUP_READ_TIMEOUT_S),
        retries={"mode": "standard", "total_max_attempts": _LOOKUP_MAX_ATTEMPTS},
    )
    # A session of our own: boto3's default session is not safe to create from several
    # threads at once, and we must not change the user's.
    try:
        session = boto3.session.Session()
        return session.client(service, region_name=region, config=config, endpoint_url=endpoint_url)
    except Exception as exc:
        raise _lookup_error(exc, what) from exc


def _within(timeout: Optional[float], what: str, fetch: Callable[[], str]) -> str:
    """``fetch()``, bounded by ``timeout`` seconds of wall-clock time (None: no bound): run
    on a thread of klime's (``klime-aws-lookup``) that the caller waits for; on the caller's
    thread where no thread may run. Raises ConfigurationError when the time runs out (the
    thread, a daemon, ends on its own within botocore's socket timeouts). Blocks."""
    from ._runtime import background_threads_allowed

    if timeout is None or not background_threads_allowed():
        return fetch()
    outcome: Dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            outcome["value"] = fetch()
        except BaseException as exc:  # handed to the caller, who raises it
            outcome["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=run, name="klime-aws-lookup", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no new thread at interpreter shutdown
        return fetch()
    if not done.wait(timeout):
        raise ConfigurationError(f"cannot read {what}: no answer within {timeout:g} s (timeout=)")
    if "error" in outcome:
        raise outcome["error"]
    value: str = outcome["value"]
    return value


# ------------------------------------------------------------------------------ quiet botocore

#: Loggers under which botocore (and urllib3 beneath it) may write what a call sends or
#: receives: ``botocore.parsers`` logs every response body at DEBUG, the secret included.
_WIRE_LOGGER_PREFIXES = ("botocore", "boto3", "urllib3")


class _QuietLookups(logging.Filter):
    """Drops the records below WARNING that botocore emits on a thread inside a klime look-up.

    Why a filter by thread and not a higher logger level for the duration of the call: a
    level is process-wide, so it would also silence the botocore debugging of every other
    thread, and two look-ups overlapping in time would restore each other's levels wrongly.
    Why not a filter on the secret's text: ``botocore.parsers`` logs the body *before*
    klime has read the secret out of it. Only the look-up's own records are dropped, on
    the thread making it (a botocore call runs on its caller's thread); everything else
    goes through untouched. Thread-safe: the set of threads is replaced, never mutated, so
    :meth:`filter` reads it without a lock.
    """

    def __init__(self) -> None:
        super().__init__("klime.aws")
        self._threads: FrozenSet[int] = frozenset()
        self._lock = threading.Lock()
        self._attached: Set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        # Logger filters run on the thread that logs, so its identity is the emitter's
        # (record.thread is None when logging.logThreads is off).
        return record.levelno >= logging.WARNING or threading.get_ident() not in self._threads

    def attach(self) -> None:
        """Attach to every botocore/boto3/urllib3 logger that exists now (idempotent).

        Filters on a logger apply only to records logged on that very logger, so each one
        gets it; called after the client is made, when botocore's modules are imported.
        """
        existing = list(logging.Logger.manager.loggerDict.items())
        names = [logging.getLogger(prefix).name for prefix in _WIRE_LOGGER_PREFIXES]
        names += [
            name
            for name, logger in existing
            if isinstance(logger, logging.Logger) and name.split(".", 1)[0] in _WIRE_LOGGER_PREFIXES
        ]
        with self._lock:
            for name in names:
                if name not in self._attached:
                    self._attached.add(name)
                    logging.getLogger(name).addFilter(self)

    @contextlib.contextmanager
    def on_this_thread(self) -> Iterator[None]:
        """Drop this thread's botocore records below WARNING while the block runs."""
        me = threading.get_ident()
        with self._lock:
            already = me in self._threads
            self._threads = self._threads | {me}
        try:
            yield
        finally:
            if not already:
                with self._lock:
                    self._threads = self._threads - {me}


_quiet = _QuietLookups()


def _call_quietly(client: Any, operation: str, **params: Any) -> Any:
    """``client.<operation>(**params)`` with botocore's wire logging off for this thread."""
    _quiet.attach()
    with _quiet.on_this_thread():
        return getattr(client, operation)(**params)


def _lookup_error(exc: BaseException, what: str) -> ConfigurationError:
    """A ConfigurationError explaining why ``what`` could not be read."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoRegionError):
        return ConfigurationError(
            f"cannot read {what}: no AWS region configured (set AWS_DEFAULT_REGION, or region in "
            "the AWS config file, or give the full ARN; on Lambda AWS_REGION is set for you)"
        )
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return ConfigurationError(f"cannot read {what}: no AWS credentials found")
    if isinstance(exc, bx.ClientError):
        code, message, status = client_error_info(exc)
        detail = f"{code}: {message}" if message else code
        if code in _MISSING_CODES:
            return ConfigurationError(f"{what} does not exist ({detail})")
        if code in _DENIED_CODES or status == 403:
            return ConfigurationError(f"access denied reading {what} ({detail})")
        return ConfigurationError(f"cannot read {what}: {detail}")
    if isinstance(exc, bx.BotoCoreError):
        return ConfigurationError(f"cannot read {what}: {exc}")
    return ConfigurationError(f"cannot read {what}: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------ the cache

_cache: Dict[Tuple[Any, ...], str] = {}
_cache_lock = threading.Lock()


def clear_write_key_cache() -> None:
    """Forget every cached write key (the next call fetches again). Thread-safe."""
    with _cache_lock:
        _cache.clear()


def _cached(key: Tuple[Any, ...], fetch: Any) -> str:
    value = _cache.get(key)
    if value is not None:
        return value
    with _cache_lock:  # one fetch per process, even when threads ask at once
        value = _cache.get(key)
        if value is None:
            value = fetch()
            _cache[key] = value
    return value


def _check_name(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"{name} must be a non-empty string")
    return value.strip()


# ------------------------------------------------------------------------------ public API


def write_key_from_ssm(
    name: str, *, decrypt: bool = True, timeout: Optional[float] = DEFAULT_LOOKUP_TIMEOUT_S
) -> str:
    """The write key stored in the SSM Parameter Store parameter ``name`` (name or ARN).

    ``decrypt`` asks for a SecureString's plain value (``kms:Decrypt`` is then needed for a
    customer-managed key). Fetched on the first call in this process and cached; blocks
    during that fetch (one request, up to 3 attempts), ``timeout`` seconds at most in all
    (None: no bound but botocore's socket timeouts). Thread-safe. Raises
    :class:`~klime.ConfigurationError` when the parameter is missing, empty or unreadable
    (access denied, no credentials, no region, no answer in time),
    :class:`MissingDependencyError` without boto3.
    """
    name = _check_name(name, "name")
    seconds = check_timeout(timeout)
    what = f"SSM parameter {name!r}"

    def fetch() -> str:
        client = _make_client("ssm", _region_from_arn(name), what, seconds)
        try:
            response = _call_quietly(client, "get_parameter", Name=name, WithDecryption=bool(decrypt))
        except Exception as exc:
            raise _lookup_error(exc, what) from exc
        value = (response.get("Parameter") or {}).get("Value")
        if not isinstance(value, str) or not value.strip():
            raise ConfigurationError(f"{what} is empty")
        log.debug("klime: write key read from %s", what)
        return value.strip()

    return _cached(("ssm", name, bool(decrypt)), lambda: _within(seconds, what, fetch))


def write_key_from_secret(
    secret_id: str, key: Optional[str] = None, *, timeout: Optional[float] = DEFAULT_LOOKUP_TIMEOUT_S
) -> str:
    """The write key stored in the Secrets Manager secret ``secret_id`` (name or ARN).

    With ``key`` the secret must be a JSON object and the write key is its field ``key``
    (the usual shape of a secret with several values); without it the secret's whole
    string is the write key. Fetched on the first call in this process and cached; blocks
    during that fetch, ``timeout`` seconds at most in all (None: no bound but botocore's
    socket timeouts). Thread-safe. Raises :class:`~klime.ConfigurationError` when the
    secret or the field is missing, empty or unreadable (or no answer came in time),
    :class:`MissingDependencyError` without boto3.
    """
    secret_id = _check_name(secret_id, "secret_id")
    if key is not None:
        key = _check_name(key, "key")
    seconds = check_timeout(timeout)
    what = f"secret {secret_id!r}"

    def fetch() -> str:
        client = _make_client("secretsmanager", _region_from_arn(secret_id), what, seconds)
        try:
            response = _call_quietly(client, "get_secret_value", SecretId=secret_id)
        except Exception as exc:
            raise _lookup_error(exc, what) from exc
        text = response.get("SecretString")
        if text is None:
            binary = response.get("SecretBinary")
            if isinstance(binary, (bytes, bytearray)):
                try:
                    text = bytes(binary).decode("utf-8")
                except UnicodeDecodeError:
                    raise ConfigurationError(f"{what} is binary and not UTF-8 text") from None
        if not isinstance(text, str) or not text.strip():
            raise ConfigurationError(f"{what} is empty")
        text = text.strip()
        if key is None:
            if text.startswith("{"):
                raise ConfigurationError(
                    f"{what} holds a JSON object; pass key= naming the field that holds the write key"
                )
            log.debug("klime: write key read from %s", what)
            return text
        try:
            document = json.loads(text)
        except ValueError:
            raise ConfigurationError(f"{what} is not a JSON object, so it has no field {key!r}") from None
        if not isinstance(document, dict):
            raise ConfigurationError(f"{what} is not a JSON object, so it has no field {key!r}")
        value = document.get(key)
        if value is None:
            raise ConfigurationError(f"{what} has no field {key!r}")
        if not isinstance(value, str) or not value.strip():
            raise ConfigurationError(f"field {key!r} of {what} is not a non-empty string")
        log.debug("klime: write key read from field %r of %s", key, what)
        return value.strip()

    return _cached(("secret", secret_id, key), lambda: _within(seconds, what, fetch))
