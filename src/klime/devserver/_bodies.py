"""Request bodies off the wire: Content-Length and chunked framing, the size limit.

A body up to :data:`klime._config.MAX_REQUEST_BYTES` is returned; a larger one is read and
thrown away (so the 413 arrives on a connection that stays usable) up to four times that,
beyond which the connection is to be closed instead. Bad framing is a :class:`Refusal`
(400) that closes the connection; a client that hangs up mid-body is :class:`ClientGone`.

Imports: the standard library, :mod:`klime._config` and :mod:`._answers` (for Refusal).
"""

from __future__ import annotations

from email.message import Message
from io import BufferedIOBase

from klime._config import MAX_REQUEST_BYTES

from ._answers import Refusal

__all__ = ["ClientGone", "read_body"]

_DISCARD_LIMIT = 4 * MAX_REQUEST_BYTES
_READ_CHUNK = 64 * 1024


class ClientGone(Exception):
    """The client closed the connection in the middle of a request."""


def read_body(rfile: BufferedIOBase, headers: Message) -> tuple[bytes | None, bool]:
    """Read one request body; return ``(body, close)``.

    ``body`` is None when it exceeded MAX_REQUEST_BYTES (it was discarded); ``close`` says
    the connection must be closed after the answer (the body was too large even to discard).
    Blocks on the socket; one thread per connection.
    """
    encoding = headers.get("Transfer-Encoding")
    if encoding is not None and encoding.strip().lower() != "identity":
        if encoding.strip().lower() != "chunked":
            raise Refusal(400, f"unsupported Transfer-Encoding: {encoding}", close=True)
        return _read_chunked(rfile)
    length_header = headers.get("Content-Length")
    if length_header is None:
        return b"", False
    try:
        length = int(length_header)
        if length < 0:
            raise ValueError(length_header)
    except ValueError:
        raise Refusal(400, "bad Content-Length", close=True) from None
    if length <= MAX_REQUEST_BYTES:
        body = rfile.read(length)
        if len(body) != length:
            raise ClientGone()
        return body, False
    if length > _DISCARD_LIMIT:
        return None, True
    _read_into(rfile, length, None)
    return None, False


def _read_chunked(rfile: BufferedIOBase) -> tuple[bytes | None, bool]:
    parts: list[bytes] = []
    total = 0
    while True:
        line = rfile.readline(1024)
        if not line:
            raise ClientGone()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise Refusal(400, "bad chunked encoding", close=True) from None
        if size == 0:
            break
        total += size
        if total > _DISCARD_LIMIT:
            return None, True
        _read_into(rfile, size, parts if total <= MAX_REQUEST_BYTES else None)
        rfile.readline(1024)  # CRLF after the chunk data
    while True:  # trailers, up to the blank line
        line = rfile.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
    return (b"".join(parts) if total <= MAX_REQUEST_BYTES else None), False


def _read_into(rfile: BufferedIOBase, size: int, parts: list[bytes] | None) -> None:
    """Read ``size`` bytes in pieces, kept in ``parts`` (None: thrown away)."""
    while size > 0:
        chunk = rfile.read(min(size, _READ_CHUNK))
        if not chunk:
            raise ClientGone()
        size -= len(chunk)
        if parts is not None:
            parts.append(chunk)
