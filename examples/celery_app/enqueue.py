"""Queue example tasks: ``python enqueue.py --count 10``."""

from __future__ import annotations

import argparse

from tasks import invoice_paid, signup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=10, help="signup tasks to queue")
    parser.add_argument("--invoices", type=int, default=1, help="invoice_paid tasks to queue")
    args = parser.parse_args()
    for i in range(args.count):
        signup.delay(f"user_{i}", "pro")
    for i in range(args.invoices):
        invoice_paid.delay(f"user_{i}", 100 + i)
    print(f"queued {args.count} signup and {args.invoices} invoice_paid tasks")


if __name__ == "__main__":
    main()
