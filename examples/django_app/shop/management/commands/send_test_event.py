"""``python manage.py send_test_event``: check that this deployment can reach Klime."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

import klime


class Command(BaseCommand):
    help = "Track test events, flush them, and report what Klime accepted."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user-id", default="django-test-user")
        parser.add_argument("--count", type=int, default=1)
        parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for Klime")

    def handle(self, *args: Any, user_id: str, count: int, timeout: float, **options: Any) -> None:
        for n in range(count):
            klime.track("Test Event", {"source": "send_test_event", "n": n}, user_id=user_id)
        # A command is a short-lived process: flush explicitly to see the outcome (the exit
        # hook would also flush, but within the client's exit_timeout and silently).
        result = klime.flush(timeout=timeout)
        self.stdout.write(f"sent {result.sent}, failed {result.failed}, unsent {result.unsent}")
        if not result.ok:
            raise CommandError("not every event reached Klime; see the klime log above")
