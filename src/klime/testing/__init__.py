"""Helpers for testing code that uses klime: capture events, assert on them, send nothing.

::

    from klime.testing import capture

    def test_signup():
        with capture() as events:
            myapp.signup("u1", plan="pro")      # calls klime somewhere inside
        events.assert_tracked("Signup", user_id="u1", properties={"plan": "pro"})

While :func:`capture` is active, every :class:`klime.Client` created gets a capturing
memory transport instead of the one it asked for, so nothing goes to the network, and its
``track``/``identify``/``group`` *and* ``*_sync`` calls are recorded. The default client
``klime.client`` (behind ``klime.track()`` and friends) is replaced by a capturing one for
the duration and put back afterwards. Clients created *before* the capture started keep
their real transport; create them inside the test (or use the default client).

A client created during a capture stays a test client: it never sends, and its later
events are recorded by whatever captures are active when they happen.

With pytest, the ``klime_events`` fixture (:mod:`klime.testing.pytest_plugin`, loaded
automatically when klime is installed) wraps each test that asks for it in :func:`capture`.

Events are the wire dicts a Klime server would receive (camelCase: ``type``, ``event``,
``userId``, ``groupId``, ``properties``, ``traits``, ``messageId``, ``timestamp``...).
Expected values given to the helpers are converted the way klime converts event data
(datetimes to ISO 8601, tuples to lists, int ids to strings...) before comparing, so you
can pass the same Python values you tracked. Everything here is thread-safe.

The parts: :mod:`._captured` (:class:`CapturedEvents`: finders, assertions, matching),
:mod:`._capture` (:func:`capture`: the capturing transport and the swapped default client),
:mod:`.pytest_plugin` (the fixture), :mod:`._mock_sender` (:class:`MockSender`: a function of
yours answers as Klime's API would, and klime's real pipeline runs against it). A tool on top
of klime: it may import any layer below it, never the ``klime`` package itself.
"""

from __future__ import annotations

from ..transports import MemoryTransport
from ._capture import capture
from ._captured import CapturedEvents
from ._mock_sender import MockRequest, MockResponse, MockSender

__all__ = ["CapturedEvents", "MemoryTransport", "MockRequest", "MockResponse", "MockSender", "capture"]
