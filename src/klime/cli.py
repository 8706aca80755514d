"""The ``klime`` command: send one event from a shell, or run a local collector.

::

    klime track "Signup" --user-id u1 --prop plan=pro --prop seats=3
    klime identify u1 --trait email=ada@example.com
    klime group org_1 --user-id u1 --trait name="Acme Inc"
    klime listen --port 8787          # a local collector that prints what arrives
    klime spool /var/lib/myapp/klime  # what a durable spool holds; --send / --clear --yes

``track``, ``identify`` and ``group`` send at once on the calling thread (the ``*_sync``
calls), print the server's answer and exit with status 0; on failure they print the error
on stderr and exit with 1 (2 for bad usage, bad input or missing configuration). The write
key comes from ``--write-key`` or ``KLIME_WRITE_KEY``, the endpoint from ``--endpoint`` or
``KLIME_ENDPOINT``. ``--prop``/``--trait`` values are parsed as JSON when they are valid
JSON (``3``, ``true``, ``["a","b"]``, ``"007"``) and taken as strings otherwise.

``spool DIR`` shows what a durable spool holds (events, bytes, oldest event, owners alive and
dead) and exits 0; ``--send`` sends the events of processes that are gone (a live process
keeps its own) and exits 0 when nothing was rejected or left behind, else 1; ``--clear
--yes`` deletes every spooled event. A missing directory or bad usage exits with 2.

Also runnable as ``python -m klime.cli``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, TextIO

from ._version import __version__
from .errors import ConfigurationError, SendError, SpoolUnavailable, ValidationError

if TYPE_CHECKING:
    from .senders.http import HttpSender
    from .spool import Claimed, Spool, SpoolStats

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

    spool = commands.add_parser(
        "spool",
        help="show, send or clear a durable spool directory",
        description="Show what a klime spool directory holds: events, bytes, the oldest event's age "
        "and its owners (processes alive or dead). --send sends the events of processes that are gone "
        "now (a live process keeps its own): accepted ones are deleted, permanent rejections reported "
        "and deleted, and on a transient failure the rest is left for later. --clear deletes every "
        "spooled event (with --yes).",
    )
    spool.add_argument("directory", metavar="DIR", help="the spool directory (Client(spool=DIR))")
    action = spool.add_mutually_exclusive_group()
    action.add_argument("--send", action="store_true", help="send the spooled events of dead processes now")
    action.add_argument("--clear", action="store_true", help="delete every spooled event (needs --yes)")
    spool.add_argument("--yes", action="store_true", help="confirm --clear")
    _connection_options(spool, top=False)
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
    run = _spool if args.command == "spool" else _send_now
    if not args.verbose:
        return run(args)
    logger = logging.getLogger("klime")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        return run(args)
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


# --------------------------------------------------------------------------- klime spool


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _age(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    for unit, scale, sub, subscale in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= scale:
            return f"{s // scale}{unit} {(s % scale) // subscale}{sub}"
    return f"{s}s"  # pragma: no cover - unreachable


def _print_spool(stats: SpoolStats, out: TextIO) -> None:
    if not stats.count and not stats.owners:
        print(f"{stats.directory}: empty", file=out)
        return
    oldest = _age(stats.oldest_age)
    print(f"{stats.directory}: {stats.count:,} events, {_size(stats.bytes)}, oldest {oldest} ago", file=out)
    print(
        f"  in flight: {stats.claimed:,}; waiting for a retry: {stats.waiting:,}; dropped by the byte cap "
        f"so far: {stats.dropped_count:,} ({_size(stats.dropped_bytes)})",
        file=out,
    )
    print(f"  owners: {stats.alive_owners} alive, {stats.dead_owners} dead", file=out)
    for o in stats.owners:
        where = f"pid {o.pid} on {o.host}" if o.pid is not None else "unregistered"
        print(
            f"    {'alive' if o.alive else 'dead ':5}  {where:<28} {o.count:>9,} events  {_size(o.bytes):>10}"
            f"  oldest {_age(o.oldest_age)}",
            file=out,
        )
    if stats.dead_owners:
        print("  (events of dead owners are adopted by the app's next live process, or by --send)", file=out)


def _describe(raw: bytes) -> str:
    try:
        event = json.loads(raw)
        name = f' "{event["event"]}"' if event.get("event") else ""
        return f"{event.get('messageId', '?')}  {event.get('type', '?')}{name}"
    except (ValueError, TypeError, AttributeError):
        return f"<{len(raw)} bytes that are not a JSON event>"


class _Drain:
    """One ``klime spool DIR --send`` run: what happened to every event it claimed."""

    def __init__(self, spool: Spool, sender: HttpSender, deadline: Any) -> None:
        self.spool = spool
        self.sender = sender
        self.deadline = deadline
        self.sent = 0
        self.requests = 0
        self.rejected: List[Dict[str, Any]] = []
        self.stopped: Optional[str] = None

    def run(self) -> None:
        rounds = self.spool.stats().count + 1  # every round settles an event or stops
        for _ in range(rounds):
            if self.deadline.expired():
                self.stopped = "--timeout reached"
                return
            batch = self.spool.claim(
                self.sender.max_batch_events, self.sender.max_batch_bytes, include_waiting=True
            )
            if not batch or not self.send(batch):
                return

    def send(self, batch: Claimed) -> bool:
        """Send and settle ``batch``; False when the run must stop (the batch is released)."""
        result = self.sender.send(batch.events, self.deadline)
        self.requests += result.requests
        error = result.error
        if error is None:
            self.sent += self.spool.ack(batch)
            return True
        status = error.status_code
        if result.too_large and len(batch) > 1:
            first, second = batch.split(range(len(batch) // 2))
            if not self.send(first):
                self.spool.release(second, retry_at=time.time())
                return False
            return self.send(second)
        if result.response is not None:  # a partial failure: some accepted, some rejected
            failed, accepted = batch.split(result.failed)
            self.sent += self.spool.ack(accepted)
            messages = {e.index: e.message for e in result.response.errors}
            reasons = [messages.get(i, error.message) for i in result.failed]
            self._reject(failed, status, reasons)
            return True
        permanent = status is not None and 400 <= status < 500 and status not in (401, 403, 408, 429)
        if permanent:
            self._reject(batch, status, [error.message] * len(batch))
            return True
        # transient, or a refused write key / unusable endpoint: keep the events, stop here
        self.spool.release(batch, retry_at=time.time())
        self.stopped = error.message if status not in (401, 403) else f"{error.message} (check the write key)"
        return False

    def _reject(self, batch: Claimed, status: Optional[int], reasons: List[str]) -> None:
        self.spool.reject(batch)
        for raw, reason in zip(batch.events, reasons):
            self.rejected.append({"event": _describe(raw), "status_code": status, "error": reason})


def _spool_send(args: argparse.Namespace, directory: str) -> int:
    from ._config import DEFAULT_ENDPOINT, ENV_ENDPOINT, ENV_WRITE_KEY, env
    from ._deadline import Deadline
    from .senders.http import HttpSender
    from .spool import Spool

    write_key = args.write_key or env(ENV_WRITE_KEY)
    if not write_key:
        print(f"klime: a write key is needed: --write-key or ${ENV_WRITE_KEY}", file=sys.stderr)
        return USAGE
    try:
        sender = HttpSender(write_key, args.endpoint or env(ENV_ENDPOINT) or DEFAULT_ENDPOINT)
    except ConfigurationError as exc:
        print(f"klime: {exc}", file=sys.stderr)
        return USAGE
    try:
        spool = Spool.open(directory)
    except SpoolUnavailable as exc:
        sender.close()
        print(f"klime: {exc}", file=sys.stderr)
        return SEND_FAILED
    try:
        adopted = spool.adopt()
        drain = _Drain(spool, sender, Deadline.after(args.timeout))
        drain.run()
        stats = spool.stats()
    except SpoolUnavailable as exc:
        print(f"klime: {exc}", file=sys.stderr)
        return SEND_FAILED
    finally:
        spool.close()
        sender.close()
    mine = [o for o in stats.owners if o.current]
    left = mine[0].count if mine else 0
    live = [o for o in stats.owners if o.alive and not o.current]
    held = sum(o.count for o in live)
    report = {
        "adopted": adopted,
        "sent": drain.sent,
        "requests": drain.requests,
        "rejected": drain.rejected,
        "left": left,
        "stopped": drain.stopped,
        "held_by_live_processes": held,
        "live_pids": [o.pid for o in live],
    }
    if args.json:
        print(json.dumps(report, sort_keys=True))
    else:
        plural = "" if drain.requests == 1 else "s"
        print(f"sent {drain.sent:,} events in {drain.requests:,} request{plural}", file=sys.stdout)
        if drain.rejected:
            print(f"rejected {len(drain.rejected):,} events (deleted from the spool):", file=sys.stdout)
            for r in drain.rejected:
                code = f"HTTP {r['status_code']}" if r["status_code"] is not None else "error"
                print(f"  {r['event']}  ({code}: {r['error']})", file=sys.stdout)
        if left:
            print(f"left {left:,} events in the spool: {drain.stopped}", file=sys.stdout)
        if held:
            pids = ", ".join(str(o.pid) for o in live)
            print(f"{held:,} events belong to live processes (pid {pids}) and were left to them")
    return OK if not drain.rejected and not left else SEND_FAILED


def _spool(args: argparse.Namespace) -> int:
    from .spool import clear, inspect

    directory = os.path.abspath(args.directory)
    if args.yes and not args.clear:
        print("klime: --yes goes with --clear", file=sys.stderr)
        return USAGE
    if not os.path.isdir(directory):
        print(f"klime: no spool directory at {directory}", file=sys.stderr)
        return USAGE
    try:
        if args.send:
            return _spool_send(args, directory)
        stats = inspect(directory)
        if args.clear:
            if not args.yes:
                print(
                    f"klime: --clear deletes {stats.count:,} events ({_size(stats.bytes)}) from {directory}; "
                    "add --yes to do it",
                    file=sys.stderr,
                )
                return USAGE
            count, nbytes = clear(directory)
            if args.json:
                print(json.dumps({"cleared": count, "bytes": nbytes}), file=sys.stdout)
            else:
                print(f"cleared {count:,} events ({_size(nbytes)}) from {directory}", file=sys.stdout)
            return OK
    except SpoolUnavailable as exc:
        print(f"klime: {exc}", file=sys.stderr)
        return SEND_FAILED
    if args.json:
        print(json.dumps(stats.to_dict(), sort_keys=True), file=sys.stdout)
    else:
        _print_spool(stats, sys.stdout)
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
