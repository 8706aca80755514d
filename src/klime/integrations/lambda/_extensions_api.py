"""A minimal blocking client of AWS Lambda's Extensions API (2020-01-01), the local HTTP
API at ``AWS_LAMBDA_RUNTIME_API`` through which klime's internal extension registers, waits
for the next event and reports errors (:mod:`._extension` drives it). A tiny
``http.client`` client is enough for that local API.

May import: the standard library only.
"""

from __future__ import annotations

import http.client
import json
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["ExtensionAPIError", "ExtensionsAPI", "REGISTER_TIMEOUT_S"]

#: Longest wait for the Extensions API's answer to the registration, seconds.
REGISTER_TIMEOUT_S = 2.0

_API = "/2020-01-01/extension"
_ID_HEADER = "Lambda-Extension-Identifier"
_ERROR_TYPE_HEADER = "Lambda-Extension-Function-Error-Type"


class ExtensionAPIError(Exception):
    """The Extensions API answered an error status (``status``, ``detail``)."""

    def __init__(self, endpoint: str, status: int, detail: str) -> None:
        super().__init__(f"{endpoint} answered {status}: {detail}")
        self.endpoint = endpoint
        self.status = status
        self.detail = detail


class ExtensionsAPI:
    """A minimal blocking client of Lambda's Extensions API at ``address`` (``host:port``,
    from ``AWS_LAMBDA_RUNTIME_API``). Not thread-safe: use it from one thread.

    ``next`` blocks without a timeout (Lambda answers when there is an event, possibly
    after a freeze of hours); the other calls time out after ``timeout`` seconds.
    """

    def __init__(self, address: str, *, timeout: float = REGISTER_TIMEOUT_S) -> None:
        self.address = address
        self.timeout = timeout
        self.identifier: Optional[str] = None
        self._next_conn: Optional[http.client.HTTPConnection] = None

    def _request(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        endpoint: str,
        body: Optional[Dict[str, Any]],
        headers: Dict[str, str],
    ) -> Tuple[Any, Dict[str, str]]:
        """One request on ``conn``: (the parsed JSON answer or None, its headers, lower-cased).
        Raises ExtensionAPIError on an error status, OSError when unreachable. Blocks."""
        payload = None if body is None else json.dumps(body).encode("utf-8")
        if payload is not None:
            headers = dict(headers, **{"Content-Type": "application/json"})
        conn.request(method, _API + endpoint, body=payload, headers=headers)
        response = conn.getresponse()
        raw = response.read()
        answer_headers = {k.lower(): v for k, v in response.getheaders()}
        if not 200 <= response.status < 300:
            raise ExtensionAPIError(endpoint, response.status, _error_detail(raw))
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return parsed, answer_headers

    def _once(
        self, method: str, endpoint: str, body: Optional[Dict[str, Any]], headers: Dict[str, str]
    ) -> Tuple[Any, Dict[str, str]]:
        """:meth:`_request` on a connection of its own, closed after. Blocks up to ``timeout``."""
        conn = http.client.HTTPConnection(self.address, timeout=self.timeout)
        try:
            return self._request(conn, method, endpoint, body, headers)
        finally:
            conn.close()

    def register(self, name: str, events: List[str]) -> str:
        """``POST /extension/register``; returns (and keeps) the extension identifier.
        Raises ExtensionAPIError (refused) or OSError (unreachable). Blocks."""
        _, headers = self._once("POST", "/register", {"events": events}, {"Lambda-Extension-Name": name})
        identifier = headers.get(_ID_HEADER.lower())
        if not identifier:
            raise ExtensionAPIError("/register", 200, "no Lambda-Extension-Identifier in the answer")
        self.identifier = identifier
        return identifier

    def next(self) -> Dict[str, Any]:
        """``GET /extension/event/next``: block until Lambda has an event for us (an INVOKE,
        or a SHUTDOWN for external extensions). A dropped keep-alive connection is retried
        once on a new one. Raises ExtensionAPIError or OSError."""
        for attempt in (1, 2):
            conn = self._next_conn
            if conn is None:
                conn = self._next_conn = http.client.HTTPConnection(self.address)  # no timeout
            try:
                event, _ = self._request(
                    conn, "GET", "/event/next", None, {_ID_HEADER: self.identifier or ""}
                )
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt == 2:
                    raise
                continue
            except BaseException:
                self.close()
                raise
            if not isinstance(event, dict):
                raise ExtensionAPIError("/event/next", 200, "the event is not a JSON object")
            return event
        raise AssertionError("unreachable")  # pragma: no cover

    def _report(self, endpoint: str, error_type: str, message: str) -> None:
        """POST an error report to ``endpoint``. Blocks up to ``timeout``; raises like :meth:`register`."""
        body = {"errorType": error_type, "errorMessage": message}
        headers = {_ID_HEADER: self.identifier or "", _ERROR_TYPE_HEADER: error_type}
        self._once("POST", endpoint, body, headers)

    def init_error(self, error_type: str, message: str) -> None:
        """``POST /extension/init/error``: Init failed after registering (Lambda fails the
        sandbox's Init). Raises like :meth:`register`. Blocks."""
        self._report("/init/error", error_type, message)

    def exit_error(self, error_type: str, message: str) -> None:
        """``POST /extension/exit/error``: the extension is giving up (Lambda resets the
        sandbox). Raises like :meth:`register`. Blocks."""
        self._report("/exit/error", error_type, message)

    def close(self) -> None:
        """Close the kept ``event/next`` connection. Never raises."""
        conn, self._next_conn = self._next_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass


def _error_detail(raw: bytes) -> str:
    """A short, readable detail of an error answer's body (its errorType and errorMessage)."""
    try:
        payload = json.loads(raw)
    except ValueError:
        return raw[:200].decode("utf-8", "replace")
    if isinstance(payload, dict):
        kind, message = payload.get("errorType"), payload.get("errorMessage")
        return f"{kind}: {message}" if kind or message else json.dumps(payload)[:200]
    return str(payload)[:200]
