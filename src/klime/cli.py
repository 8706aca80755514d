"""The ``klime`` command: send one event from a shell, or run a local collector.

::

    klime track "Signup" --user-id u1 --prop plan=pro --prop seats=3
    klime identify u1 --trait email=ada@example.com
    klime group org_1 --user-id u1 --trait name="Acme Inc"
    klime listen --port 8787          # a local collector that prints what arrives

``track``, ``identify`` and ``group`` send at once on the calling thread (the ``*_sync``
calls), print the server's answer and exit with status 0; on failure they print the error
on stderr and exit with 1 (2 for bad usage, bad input or missing configuration). The write
key comes from ``--write-key`` or ``KLIME_WRITE_KEY``, the endpoint from ``--endpoint`` or
``KLIME_ENDPOINT``. ``--prop``/``--trait`` values are parsed as JSON when they are valid
JSON (``3``, ``true``, ``["a","b"]``, ``"007"``) and taken as strings otherwise.

Also runnable as ``python -m klime.cli``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence, TextIO

from ._version import __version__
from .errors import ConfigurationError, SendError, ValidationError

__all__ = ["main"]

#: Exit statuses.
OK = 0
SEND_FAILED = 1
USAGE = 2

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


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="klime",
        description="Send an event to Klime from the command line, or run a local collector.",
        epilog="Run 'klime COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"klime {__version__}")
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    track = commands.add_parser(
        "track",
        help="send a track event",
        description="Send one track event now and print the server's answer. Needs --user-id or --group-id.",
    )
    track.add_argument("event", metavar="EVENT", help='the event name, e.g. "Button Clicked"')
    track.add_argument("--user-id", metavar="ID", help="the user who did it")
    track.add_argument("--group-id", metavar="ID", help="the group (account) it belongs to")
    _pairs_option(track, "--prop", "-p", "a property")
    _connection_options(track, top=False)

    identify = commands.add_parser(
        "identify",
        help="send an identify event",
        description="Attach traits to a user now and print the server's answer.",
    )
    identify.add_argument("user_id", metavar="USER_ID")
    _pairs_option(identify, "--trait", "-t", "a trait")
    _connection_options(identify, top=False)

    group = commands.add_parser(
        "group",
        help="send a group event",
        description="Attach traits to a group (and link a user to it) now and print the server's answer.",
    )
    group.add_argument("group_id", metavar="GROUP_ID")
    group.add_argument("--user-id", metavar="ID", help="link this user to the group")
    _pairs_option(group, "--trait", "-t", "a trait")
    _connection_options(group, top=False)

    listen = commands.add_parser(
        "listen",
        help="run a local collector that prints every event it receives",
        description="Run a Klime-compatible collector on this machine and print each event "
        "as it arrives (Ctrl-C to stop; a summary follows). Point an app at it with "
        "KLIME_ENDPOINT=http://127.0.0.1:PORT. Same server as 'python -m klime.devserver'.",
    )
    listen.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    listen.add_argument(
        "--port", type=int, default=8787, help="port to listen on (default: 8787; 0 picks a free one)"
    )
    listen.add_argument(
        "--write-key",
        dest="listen_write_key",
        metavar="KEY",
        help="accept only this write key (default: any)",
    )
    listen.add_argument(
        "--fail", metavar="STATUS", help="answer every batch with STATUS (e.g. 500), to test failures"
    )
    listen.add_argument("--quiet", action="store_true", help="print only the summary")
    return parser


def _print_response(response: Any, as_json: bool, out: TextIO) -> None:
    if as_json:
        print(json.dumps(asdict(response), sort_keys=True), file=out)
        return
    print(
        f"{response.status}: {response.accepted} accepted, {response.failed} failed "
        f"(HTTP {response.status_code})",
        file=out,
    )
    for error in response.errors:
        print(f"  event {error.index}: {error.message} ({error.code})", file=out)


def _print_error(error: SendError, as_json: bool) -> None:
    if as_json:
        payload: Dict[str, Any] = {
            "error": error.message,
            "status_code": error.status_code,
            "retryable": error.retryable,
        }
        if error.response is not None:
            payload["response"] = asdict(error.response)
        print(json.dumps(payload, sort_keys=True), file=sys.stderr)
        return
    status = f" (HTTP {error.status_code})" if error.status_code is not None else ""
    print(f"klime: send failed{status}: {error.message}", file=sys.stderr)


def _send(args: argparse.Namespace) -> int:
    if not args.verbose:
        return _send_now(args)
    logger = logging.getLogger("klime")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        return _send_now(args)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _send_now(args: argparse.Namespace) -> int:
    from ._client import Client

    try:
        client = Client(args.write_key, endpoint=args.endpoint, transport="blocking")
    except ConfigurationError as exc:
        print(f"klime: {exc}", file=sys.stderr)
        return USAGE
    try:
        if args.command == "track":
            response = client.track_sync(
                args.event,
                dict(args.prop),
                user_id=args.user_id,
                group_id=args.group_id,
                timeout=args.timeout,
            )
        elif args.command == "identify":
            response = client.identify_sync(args.user_id, dict(args.trait), timeout=args.timeout)
        else:
            response = client.group_sync(
                args.group_id, dict(args.trait), user_id=args.user_id, timeout=args.timeout
            )
    except ValidationError as exc:
        print(f"klime: {exc}", file=sys.stderr)
        return USAGE
    except SendError as exc:
        _print_error(exc, args.json)
        return SEND_FAILED
    finally:
        client.shutdown(timeout=0)
    _print_response(response, args.json, sys.stdout)
    return OK


def _listen(args: argparse.Namespace) -> int:
    from . import devserver

    argv: List[str] = ["--host", args.host, "--port", str(args.port)]
    if args.listen_write_key:
        argv += ["--write-key", args.listen_write_key]
    if args.fail:
        argv += ["--fail", args.fail]
    if args.quiet:
        argv.append("--quiet")
    return devserver.main(argv)


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
        return _listen(args)
    try:
        return _send(args)
    except KeyboardInterrupt:
        print("klime: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
