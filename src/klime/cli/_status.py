"""Exit statuses of the ``klime`` command, and the one way its commands report a failure.

May import: the standard library only.
"""

from __future__ import annotations

import sys

__all__ = ["OK", "SEND_FAILED", "USAGE", "INTERRUPTED", "fail"]

#: Exit statuses.
OK = 0
SEND_FAILED = 1
USAGE = 2
INTERRUPTED = 130


def fail(message: object, status: int) -> int:
    """Print ``klime: message`` on stderr and return ``status`` (the command's exit status)."""
    print(f"klime: {message}", file=sys.stderr)
    return status
