"""klime's pytest plugin: the ``klime_events`` fixture.

Installed with klime (entry point ``pytest11``, name ``klime``), so the fixture is there in
every test suite without a conftest line; disable it with ``-p no:klime``. Loading the
plugin only defines the fixture: nothing changes for tests that do not ask for it, and
klime's testing machinery is imported the first time a test does.

May import: pytest, and :mod:`klime.testing` inside the fixture.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pytest

if TYPE_CHECKING:
    from klime.testing import CapturedEvents

__all__ = ["klime_events"]


@pytest.fixture
def klime_events() -> Iterator[CapturedEvents]:
    """Capture every klime event of the test instead of sending it.

    Every ``klime.Client`` created during the test, and the default client behind
    ``klime.track()`` & co., records its events (``*_sync`` calls included) with no network.
    Yields a :class:`klime.testing.CapturedEvents`: ``klime_events.events``,
    ``klime_events.assert_tracked("Signup", user_id="u1")``, ``assert_identified``,
    ``assert_grouped``, ``tracked(...)``, ``clear()``.
    """
    from klime.testing import capture

    with capture() as captured:
        yield captured
