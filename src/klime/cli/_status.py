"""Exit statuses of the ``klime`` command, the one way its commands report a failure, and
how they make text from elsewhere (a server's answer, an event) safe to print.

May import: the standard library and klime._terminal.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .._terminal import printable

__all__ = ["OK", "SEND_FAILED", "USAGE", "INTERRUPTED", "fail", "json_line", "printable"]

#: Exit statuses.
OK = 0
SEND_FAILED = 1
USAGE = 2
INTERRUPTED = 130


def json_line(payload: Any) -> str:
    """``payload`` as one line of JSON safe for a terminal: ``json.dumps`` escapes C0 and,
    in ASCII mode, C1; DEL is the one control character it leaves, so it is escaped too."""
    return json.dumps(payload, sort_keys=True).replace("\x7f", "\\u007f")


def fail(message: object, status: int) -> int:
    """Print ``klime: message`` (control characters escaped) on stderr and return
    ``status`` (the command's exit status)."""
    print(f"klime: {printable(message)}", file=sys.stderr)
    return status
