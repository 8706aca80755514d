"""The ``klime`` command's argument parsing and :func:`main`, which hands each command to
its module (:mod:`._send`, :mod:`._spool`, :mod:`._listen`, :mod:`._import`).

May import: the other modules of ``klime.cli``, the model (the version) and the standard
library. What a command needs from the rest of klime its module imports on first use, so
that ``klime --help`` stays quick.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable, Optional, Sequence, Tuple

from .._version import __version__
from ._import import add_import_command, import_command
from ._listen import listen
from ._send import send_now
from ._spool import spool
from ._status import INTERRUPTED, USAGE, printable

__all__ = ["main", "parse_value"]

DEFAULT_TIMEOUT_S = 30.0


def parse_value(text: str) -> Any:
    """A ``--prop``/``--trait`` value: JSON when ``text`` is valid JSON, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pair(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, parse_value(value)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def _pairs_option(parser: argparse.ArgumentParser, flag: str, short: str, what: str) -> None:
    parser.add_argument(
        flag,
        short,
        type=_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"{what} (repeatable); VALUE is JSON if it parses, else a string",
    )


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Given on the top level (before the command) or on the command; the command's copy
    # must not overwrite the top level's value when absent, hence SUPPRESS there.
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--write-key",
        default=default,
        metavar="KEY",
        help="the project's write key (default: $KLIME_WRITE_KEY)",
    )
    parser.add_argument(
        "--endpoint",
        default=default,
        metavar="URL",
        help="where to send (default: $KLIME_ENDPOINT, else https://i.klime.com)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=DEFAULT_TIMEOUT_S if top else argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"give up after this long, retries included (default: {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print the server's answer as JSON",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="log what klime does (retries, errors) on stderr",
    )


def _send_command(
    commands: Any,
    name: str,
    summary: str,
    description: str,
    positional: Tuple[str, str, Optional[str]],
    ids: Sequence[Tuple[str, str]],
    pairs: Tuple[str, str, str],
) -> None:
    """Add the sub-command ``name`` that sends one event: its positional argument (dest,
    metavar, help), its id options (flag, help), its KEY=VALUE option (flag, short flag,
    what) and the connection options, in the order ``--help`` lists them."""
    command = commands.add_parser(name, help=summary, description=description)
    dest, metavar, help_ = positional
    command.add_argument(dest, metavar=metavar, help=help_)
    for flag, text in ids:
        command.add_argument(flag, metavar="ID", help=text)
    _pairs_option(command, *pairs)
    _connection_options(command, top=False)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klime",
        description="Send an event to Klime from the command line, import history, or run a local collector.",
        epilog="Run 'klime COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"klime {__version__}")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _send_command(
        commands,
        "track",
        "send a track event",
        "Send one track event now and print the server's answer. Needs --user-id or --group-id.",
        ("event", "EVENT", 'the event name, e.g. "Button Clicked"'),
        [("--user-id", "the user who did it"), ("--group-id", "the group (account) it belongs to")],
        ("--prop", "-p", "a property"),
    )
    _send_command(
        commands,
        "identify",
        "send an identify event",
        "Attach traits to a user now and print the server's answer.",
        ("user_id", "USER_ID", None),
        [],
        ("--trait", "-t", "a trait"),
    )
    _send_command(
        commands,
        "group",
        "send a group event",
        "Attach traits to a group (and link a user to it) now and print the server's answer.",
        ("group_id", "GROUP_ID", None),
        [("--user-id", "link this user to the group")],
        ("--trait", "-t", "a trait"),
    )

    listen_command = commands.add_parser(
        "listen",
        help="run a local collector that prints every event it receives",
        description="Run a Klime-compatible collector on this machine and print each event "
        "as it arrives (Ctrl-C to stop; a summary follows). Point an app at it with "
        "KLIME_ENDPOINT=http://127.0.0.1:PORT. Same server as 'python -m klime.devserver'.",
    )
    listen_command.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    listen_command.add_argument(
        "--port", type=int, default=8787, help="port to listen on (default: 8787; 0 picks a free one)"
    )
    listen_command.add_argument(
        "--write-key",
        dest="listen_write_key",
        metavar="KEY",
        help="accept only this write key (default: any)",
    )
    listen_command.add_argument(
        "--fail", metavar="STATUS", help="answer every batch with STATUS (e.g. 500), to test failures"
    )
    listen_command.add_argument("--quiet", action="store_true", help="print only the summary")

    spool_command = commands.add_parser(
        "spool",
        help="show, send or clear a durable spool directory",
        description="Show what a klime spool directory holds: events, bytes, the oldest event's age "
        "and its owners (processes alive or dead). --send sends the events of processes that are gone "
        "now (a live process keeps its own): accepted ones are deleted, permanent rejections reported "
        "and deleted, and on a transient failure the rest is left for later. --clear deletes every "
        "spooled event (with --yes).",
    )
    spool_command.add_argument("directory", metavar="DIR", help="the spool directory (Client(spool=DIR))")
    action = spool_command.add_mutually_exclusive_group()
    action.add_argument("--send", action="store_true", help="send the spooled events of dead processes now")
    action.add_argument("--clear", action="store_true", help="delete every spooled event (needs --yes)")
    spool_command.add_argument("--yes", action="store_true", help="confirm --clear")
    _connection_options(spool_command, top=False)
    add_import_command(commands, _connection_options)
    return parser


class _PrintableFormatter(logging.Formatter):
    """Log lines for a terminal: control characters that came from a server are escaped;
    a traceback keeps its line breaks."""

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(printable(line) for line in super().format(record).split("\n"))


def _verbosely(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command; with ``--verbose``, with klime's log records on stderr meanwhile."""
    if not args.verbose:
        return run(args)
    logger = logging.getLogger("klime")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PrintableFormatter("%(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        return run(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``klime`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit
    status. ``track``/``identify``/``group`` block until the server answers (or
    ``--timeout``); ``listen`` blocks until interrupted."""
    parser = _build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    if args.command == "listen":
        return listen(args)
    run = {"spool": spool, "import": import_command}.get(args.command, send_now)
    try:
        return _verbosely(run, args)
    except KeyboardInterrupt:
        print("klime: interrupted", file=sys.stderr)
        return INTERRUPTED
