"""Text from elsewhere (a server's answer, an event) made safe to print on a terminal.

One rule for every tool of klime (the ``klime`` command, the local collector's echo, the
spool command): each control character — C0 (ESC, BEL, CR, LF... included), DEL and C1
(CSI, OSC... as single code points) — is written as ``\\xNN``, so that no text can move the
cursor, retitle the window or forge a line; every other character, Unicode included, is
kept.

May import: the standard library only (layer 0).
"""

from __future__ import annotations

__all__ = ["printable"]

_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in (*range(0x20), 0x7F, *range(0x80, 0xA0))}


def printable(text: object) -> str:
    """``str(text)`` with every control character written as ``\\xNN``
    (``"\\x1b]0;t\\x07"`` stays visible as such). Pure, thread-safe."""
    return str(text).translate(_CONTROL_ESCAPES)
