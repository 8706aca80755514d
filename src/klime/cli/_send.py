"""``klime track`` / ``identify`` / ``group``: send one event now on the calling thread (the
``*_sync`` calls of a blocking client) and print the server's answer, or the error.

May import: the face (``Client``, on first use), the model (errors) and the standard library.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any, Dict, TextIO

from ..errors import ConfigurationError, SendError, ValidationError
from ._status import OK, SEND_FAILED, USAGE, fail, json_line, printable

__all__ = ["send_now"]


def _print_response(response: Any, as_json: bool, out: TextIO) -> None:
    # The answer is the server's text: printed with its control characters escaped.
    if as_json:
        print(json_line(asdict(response)), file=out)
        return
    print(
        printable(
            f"{response.status}: {response.accepted} accepted, {response.failed} failed "
            f"(HTTP {response.status_code})"
        ),
        file=out,
    )
    for error in response.errors:
        print(printable(f"  event {error.index}: {error.message} ({error.code})"), file=out)


def _print_error(error: SendError, as_json: bool) -> None:
    if as_json:
        payload: Dict[str, Any] = {
            "error": error.message,
            "status_code": error.status_code,
            "retryable": error.retryable,
        }
        if error.response is not None:
            payload["response"] = asdict(error.response)
        print(json_line(payload), file=sys.stderr)
        return
    status = f" (HTTP {error.status_code})" if error.status_code is not None else ""
    print(printable(f"klime: send failed{status}: {error.message}"), file=sys.stderr)


def send_now(args: argparse.Namespace) -> int:
    """Send the event ``args`` describe; blocks until the server answers or ``--timeout``.
    Returns the exit status: 0 sent, 1 the send failed, 2 bad input or configuration."""
    from .._client import Client

    try:
        client = Client(args.write_key, endpoint=args.endpoint, transport="blocking")
    except ConfigurationError as exc:
        return fail(exc, USAGE)
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
        return fail(exc, USAGE)
    except SendError as exc:
        _print_error(exc, args.json)
        return SEND_FAILED
    finally:
        client.shutdown(timeout=0)
    _print_response(response, args.json, sys.stdout)
    return OK
