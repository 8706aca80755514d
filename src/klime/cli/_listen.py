"""``klime listen``: run the local collector (:mod:`klime.devserver`) from the ``klime``
command, passing on the options it was given.

May import: the local collector (on first use) and the standard library.
"""

from __future__ import annotations

import argparse
from typing import List

__all__ = ["listen"]


def listen(args: argparse.Namespace) -> int:
    """Run the collector until interrupted (blocks); return its exit status."""
    from .. import devserver

    argv: List[str] = ["--host", args.host, "--port", str(args.port)]
    if args.listen_write_key:
        argv += ["--write-key", args.listen_write_key]
    if args.fail:
        argv += ["--fail", args.fail]
    if args.quiet:
        argv.append("--quiet")
    return devserver.main(argv)
