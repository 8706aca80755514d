"""Chooses what ``make check`` leaves out: the tests that take more than a moment.

``make check`` (the edit-test loop of issue 21) runs the suite without the real-server files
(listed in the Makefile) and without the tests listed in ``tools/check-deselect.txt``, one
``--deselect=<node id>`` a line, read by pytest as ``@tools/check-deselect.txt``. This script
writes that file from a pytest ``--durations=0`` report: every test whose setup, call and
teardown add up to ``--threshold`` seconds or more. ``make check-durations`` measures and
rewrites it; a test renamed since simply runs again until the next refresh.

    python tools/check_select.py REPORT... [--threshold 0.2] [--out tools/check-deselect.txt]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tools" / "check-deselect.txt"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(tests/\S.*?)\s*$")


def slow_tests(reports: Sequence[str], threshold: float) -> Dict[str, float]:
    """``{node id: seconds}`` of the tests at or over ``threshold`` (their most in any report)."""
    slowest: Dict[str, float] = {}
    for report in reports:
        seconds: Dict[str, float] = {}
        for line in report.splitlines():
            match = _DURATION.match(line)
            if match:
                seconds[match.group(2)] = seconds.get(match.group(2), 0.0) + float(match.group(1))
        for node, spent in seconds.items():
            slowest[node] = max(slowest.get(node, 0.0), spent)
    return {node: spent for node, spent in slowest.items() if spent >= threshold}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", type=Path, nargs="+", help="outputs of pytest --durations=0")
    parser.add_argument("--threshold", type=float, default=0.2, help="seconds (default 0.2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    texts = [report.read_text(encoding="utf-8", errors="replace") for report in args.reports]
    slow = slow_tests(texts, args.threshold)
    if not slow:
        print(f"check_select: no durations in the reports; {args.out} left as it was")
        return 1
    lines = [f"--deselect={node}" for node in sorted(slow)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(
        f"check_select: {len(slow)} tests of {args.threshold} s or more ({sum(slow.values()):.0f} s in all) "
        f"written to {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
