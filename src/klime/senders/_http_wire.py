"""What the HTTP sender must know of Klime's endpoint and answers: which endpoints are
acceptable (https, or a loopback host), which header values can be sent, which request
errors no retry can fix and which mean a stale pooled connection, and how an error answer
or exception is described in one short, key-free line.

Pure functions over ``requests``' objects; no I/O. May import: the model (``errors``).
"""

from __future__ import annotations

import ipaddress
import json
from urllib.parse import urlsplit

import requests

from ..errors import ConfigurationError, quote_body

__all__ = [
    "PERMANENT_REQUEST_ERRORS",
    "describe_exception",
    "header_safe",
    "is_stale_connection",
    "read_text",
    "short",
    "validate_endpoint",
]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_endpoint(endpoint: str, *, allow_insecure: bool = False) -> str:
    """Check ``endpoint`` and return it without a trailing slash.

    ``https://`` is required, except for a loopback host (``localhost``, ``127.0.0.0/8``,
    ``::1``) or when ``allow_insecure`` is True. Raises ConfigurationError.
    """
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ConfigurationError("endpoint must be a non-empty URL string")
    endpoint = endpoint.strip().rstrip("/")
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


#: Request errors that no retry can fix.
PERMANENT_REQUEST_ERRORS = (
    requests.exceptions.InvalidHeader,
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
)


def is_stale_connection(exc: BaseException) -> bool:
    """A pooled connection the peer closed (e.g. during a Lambda freeze): retry at once."""
    if isinstance(exc, (requests.exceptions.ConnectTimeout, requests.exceptions.ReadTimeout)):
        return False
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return False
    text = repr(exc)
    return "Connection aborted" in text or "RemoteDisconnected" in text or "ConnectionResetError" in text


def short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(response: requests.Response) -> str:
    try:
        body = response.content
    except Exception:  # a body that breaks while being read: the status says enough
        return ""
    text = quote_body(body)
    try:
        payload = json.loads(body)
    except ValueError:
        return text
    if isinstance(payload, dict) and isinstance(payload.get("message"), str):
        return quote_body(payload["message"])
    return text


def describe_exception(exc: BaseException) -> str:
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connection timed out"
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return "read timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        if "Connection refused" in text:
            return "connection refused"
        if "Connection aborted" in text or "reset" in text.lower():
            return "connection reset"
        return "connection error"
    return type(exc).__name__
