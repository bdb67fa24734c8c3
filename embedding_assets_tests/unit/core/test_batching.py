"""token_batches: order kept, every index once, both limits held."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedding_assets.core.batching import padded_batches, token_batches


@pytest.mark.parametrize(
    ("counts", "max_inputs", "max_tokens", "expected"),
    [
        ([], 4, 100, []),
        ([1, 1, 1, 1, 1], 2, 100, [[0, 1], [2, 3], [4]]),
        ([40, 40, 40, 10], 10, 100, [[0, 1], [2, 3]]),
        ([50, 50, 1], 10, 100, [[0, 1], [2]]),  # exactly at the token limit
        ([10, 500, 10, 10], 10, 100, [[0], [1], [2, 3]]),  # oversize input alone
        ([500], 10, 100, [[0]]),
        ([0, 0, 0], 2, 1, [[0, 1], [2]]),  # empty texts count for the input limit only
        ([3, 3, 3], 1, 100, [[0], [1], [2]]),
    ],
)
def test_token_batches(counts, max_inputs, max_tokens, expected):
    assert token_batches(counts, max_inputs, max_tokens) == expected


@pytest.mark.parametrize(
    ("counts", "max_inputs", "max_tokens", "message"),
    [
        ([1], 0, 10, "max_inputs"),
        ([1], 1, 0, "max_tokens"),
        ([1], True, 10, "max_inputs"),
        ([1, -1], 2, 10, "input 1 is negative"),
    ],
)
def test_token_batches_rejects_bad_arguments(counts, max_inputs, max_tokens, message):
    with pytest.raises(ValueError, match=message):
        token_batches(counts, max_inputs, max_tokens)


@settings(database=None)  # no .hypothesis/ folder in the work tree
@given(
    counts=st.lists(st.integers(min_value=0, max_value=300), max_size=200),
    max_inputs=st.integers(min_value=1, max_value=20),
    max_tokens=st.integers(min_value=1, max_value=500),
)
def test_token_batches_properties(counts, max_inputs, max_tokens):
    batches = token_batches(counts, max_inputs, max_tokens)
    # Every index exactly once, in order.
    assert [i for batch in batches for i in batch] == list(range(len(counts)))
    for batch in batches:
        assert 1 <= len(batch) <= max_inputs
        tokens = sum(counts[i] for i in batch)
        # Only a single input that alone is over the limit may exceed it.
        assert tokens <= max_tokens or (len(batch) == 1 and counts[batch[0]] > max_tokens)
    # Greedy: no batch could have taken the next batch's first input.
    for batch, following in zip(batches, batches[1:], strict=False):
        tokens = sum(counts[i] for i in batch)
        assert len(batch) == max_inputs or tokens + counts[following[0]] > max_tokens


@pytest.mark.parametrize(
    ("counts", "max_inputs", "budget", "expected"),
    [
        ([], 4, 100, []),
        ([5, 1, 3], 10, 100, [[1, 2, 0]]),  # sorted by count
        ([2, 2, 2, 2], 10, 100, [[0, 1, 2, 3]]),  # ties keep input order
        ([10, 10, 10, 10, 10], 2, 100, [[0, 1], [2, 3], [4]]),  # input cap
        ([10, 40, 40, 40], 10, 100, [[0, 1], [2, 3]]),  # 3 x 40 would pad to 120
        ([200, 1], 10, 100, [[1], [0]]),  # an input over the budget goes alone
    ],
)
def test_padded_batches(counts, max_inputs, budget, expected):
    assert padded_batches(counts, max_inputs, budget) == expected


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(min_value=0, max_value=300), max_size=200),
    max_inputs=st.integers(min_value=1, max_value=64),
    budget=st.integers(min_value=1, max_value=4096),
)
def test_padded_batches_hold_every_index_once_within_limits(counts, max_inputs, budget):
    batches = padded_batches(counts, max_inputs, budget)
    assert sorted(i for batch in batches for i in batch) == list(range(len(counts)))
    for batch in batches:
        assert 1 <= len(batch) <= max_inputs
        longest = max(counts[i] for i in batch)
        assert len(batch) == 1 or len(batch) * longest <= budget
        assert [counts[i] for i in batch] == sorted(counts[i] for i in batch)


def test_padded_batches_refuse_bad_limits():
    with pytest.raises(ValueError, match="max_inputs"):
        padded_batches([1], 0, 10)
    with pytest.raises(ValueError, match="max_padded_tokens"):
        padded_batches([1], 1, 0)
