"""klime._batching: one pure function splits events by count and bytes (property-tested)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from klime._batching import BODY_OVERHEAD, batch_body, body_size, split_batches

events = st.lists(
    st.binary(min_size=1, max_size=300).map(lambda b: json.dumps(b.hex()).encode()),
    max_size=120,
)


@given(events, st.integers(1, 100), st.integers(BODY_OVERHEAD + 300, 4000))
@settings(max_examples=300, deadline=None)
def test_every_event_once_in_order_and_limits_kept(evs, max_count, max_bytes):
    batches = split_batches(evs, max_count, max_bytes)
    assert [e for b in batches for e in b] == evs  # exactly once, order kept
    for b in batches:
        assert 1 <= len(b) <= max_count
        assert body_size(b) <= max_bytes
        assert len(batch_body(b)) == body_size(b)


@given(events, st.integers(1, 100), st.integers(BODY_OVERHEAD + 300, 4000))
@settings(max_examples=300, deadline=None)
def test_no_batch_is_needlessly_small(evs, max_count, max_bytes):
    batches = split_batches(evs, max_count, max_bytes)
    for current, following in zip(batches, batches[1:]):
        # a batch ends only where taking the next event would break a limit
        grown = [*current, following[0]]
        assert len(grown) > max_count or body_size(grown) > max_bytes


def test_body_is_the_wire_shape():
    body = batch_body([b'{"a":1}', b'{"b":2}'])
    assert body == b'{"batch":[{"a":1},{"b":2}]}'
    assert json.loads(body) == {"batch": [{"a": 1}, {"b": 2}]}


def test_an_event_larger_than_the_limit_travels_alone():
    big = b'"' + b"x" * 100 + b'"'
    assert split_batches([b"1", big, b"2"], 10, 50) == [[b"1"], [big], [b"2"]]


def test_real_limits_split_ten_mib():
    event = b'"' + b"x" * 204_000 + b'"'
    batches = split_batches([event] * 100, 100, 10 * 1024 * 1024)
    assert [len(b) for b in batches] == [51, 49]
    assert all(body_size(b) <= 10 * 1024 * 1024 for b in batches)
