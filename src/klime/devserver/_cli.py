"""The command line: ``python -m klime.devserver`` (and ``klime listen``, which calls :func:`main`).

Serves until Ctrl-C or SIGTERM, echoing each event, then prints a summary; with
``-- CMD ARGS...`` it runs CMD with ``KLIME_ENDPOINT`` and ``KLIME_WRITE_KEY`` pointing at the
collector and exits with CMD's status. ``--fail``, ``--retry-after``, ``--delay`` set a
standing fault, ``--random-faults`` and ``--seed`` a random schedule.

Imports: the standard library and the devserver's :class:`Collector`, :class:`Fault` and
printer; it is the top of the package: nothing in it imports this module.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from ._collector import Collector
from ._faults import Fault
from ._printer import summary

__all__ = ["main"]


def _parse_rates(text: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        spec, sep, rate = item.rpartition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected SPEC=RATE, got {item!r}")
        try:
            rates[spec.strip()] = float(rate)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad rate in {item!r}") from None
    return rates


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m klime.devserver",
        description="A local Klime-compatible collector: prints every event that arrives. "
        "With '-- CMD ARGS...' it runs CMD with KLIME_ENDPOINT and KLIME_WRITE_KEY set, "
        "then prints a summary and exits with CMD's status.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8787, help="port (8787; 0 picks a free one)")
    parser.add_argument("--write-key", help="accept only this write key (default: any)")
    parser.add_argument(
        "--fail",
        metavar="STATUS",
        help="answer every batch with STATUS (or a fault: 'reset_before_read', ...)",
    )
    parser.add_argument("--retry-after", metavar="VALUE", help="Retry-After for --fail")
    parser.add_argument("--delay", type=float, metavar="SECONDS", help="wait before answering")
    parser.add_argument(
        "--random-faults",
        type=_parse_rates,
        metavar="SPEC=RATE,...",
        help="random faults, e.g. '500=0.2,429=0.05,reset_before_read=0.02'",
    )
    parser.add_argument("--seed", type=int, help="seed for --random-faults")
    parser.add_argument("--quiet", action="store_true", help="do not print each event")
    return parser


def _mode_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Fault | None:
    try:
        if args.fail is None:
            if args.retry_after is not None:
                parser.error("--retry-after needs --fail")
            return Fault.slow(args.delay) if args.delay else None
        fault = Fault.parse(args.fail)
        if fault.kind == "status":
            return Fault.status_code(
                int(fault.status or 500), retry_after=args.retry_after, delay=args.delay or 0.0
            )
        if args.retry_after is not None:
            parser.error("--retry-after applies to a status only")
        if args.delay is not None:
            return Fault(fault.kind, delay=args.delay, failed_indices=fault.failed_indices)
        return fault
    except ValueError as exc:
        parser.error(str(exc))
    return None  # unreachable: parser.error exits


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status. Blocks until Ctrl-C (or CMD exits)."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, command = arguments[:split], arguments[split + 1 :]
    parser = _build_parser()
    args = parser.parse_args(arguments)
    mode = _mode_from_args(parser, args)

    collector = Collector(
        args.host,
        args.port,
        write_key=args.write_key,
        echo=None if args.quiet else sys.stdout,
        seed=args.seed,
    )
    collector.set_mode(mode)
    if args.random_faults:
        try:
            collector.set_random_faults(args.seed, args.random_faults)
        except ValueError as exc:
            parser.error(str(exc))
    try:
        collector.start()
    except OSError as exc:
        print(f"klime devserver: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    previous = _on_sigterm()
    try:
        if command:
            _announce(collector)
            return _run_command(collector, command, args.write_key or "demo-write-key")
        try:
            _announce(collector)  # a Ctrl-C right after this line is still a clean stop
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        collector.stop()
        print(summary(collector.events()), flush=True)
        return 0
    finally:
        collector.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _announce(collector: Collector) -> None:
    print(f"klime devserver listening on {collector.url}", flush=True)
    if collector.random_seed is not None:
        print(f"random faults with seed {collector.random_seed}", flush=True)


def _run_command(collector: Collector, command: list[str], write_key: str) -> int:
    env = dict(os.environ)
    env["KLIME_ENDPOINT"] = collector.url
    env["KLIME_WRITE_KEY"] = write_key
    try:
        process = subprocess.Popen(command, env=env)
    except OSError as exc:
        print(f"klime devserver: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    try:
        code = process.wait()
    except KeyboardInterrupt:
        try:
            code = process.wait(timeout=5)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            process.kill()
            code = process.wait()
    collector.stop()
    sys.stdout.flush()
    requests = collector.requests()
    rejected = sum(1 for r in requests if r.status != 200 or r.fault is not None)
    print(summary(collector.events()), flush=True)
    if rejected:
        print(f"({len(requests)} requests, {rejected} rejected or faulted)", flush=True)
    return 128 - code if code < 0 else code


def _on_sigterm() -> Any:
    """Make SIGTERM behave like Ctrl-C in the main thread; return the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, _interrupt)
    except (ValueError, OSError):
        return None
