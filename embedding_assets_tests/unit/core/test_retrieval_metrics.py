import math

import pytest

from embedding_assets.core.retrieval_metrics import (
    mean_metrics,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    unique_rows,
)


def test_recall_counts_relevant_rows_within_k() -> None:
    assert recall_at_k(["a", "b", "c"], {"a", "c", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "b", "c"], {"a", "c"}, 3) == 1.0
    assert recall_at_k(["a"], set(), 10) == 0.0


def test_mrr_is_the_inverse_rank_of_the_first_relevant_row_within_k() -> None:
    assert mrr_at_k(["x", "y", "a"], {"a"}, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(["x", "y", "a"], {"a"}, 2) == 0.0
    assert mrr_at_k(["a", "b"], {"a", "b"}, 10) == 1.0


def test_ndcg_against_hand_computed_values() -> None:
    assert ndcg_at_k(["a", "b"], {"a", "b"}, 10) == 1.0
    # One relevant row at rank 2: (1/log2 3) / (1/log2 2).
    assert ndcg_at_k(["x", "a"], {"a"}, 10) == pytest.approx(1 / math.log2(3))
    # Two relevant rows, one found at rank 3: (1/log2 4) / (1 + 1/log2 3).
    expected = (1 / math.log2(4)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["x", "y", "a"], {"a", "b"}, 3) == pytest.approx(expected)
    assert ndcg_at_k(["x"], {"a"}, 1) == 0.0


def test_a_rows_chunks_count_once_at_its_best_rank_and_means_are_averages() -> None:
    assert unique_rows(["a", "a", "b", "a", "c"]) == ["a", "b", "c"]
    found = mean_metrics([(["a", "a", "b"], {"b"}), (["x"], {"y"})], k=2)
    assert found.queries == 2
    assert found.mrr_at_k == pytest.approx(0.25)  # (1/2 + 0) / 2: "b" is 2nd once deduplicated
    assert found.recall_at_k == pytest.approx(0.5)
    assert mean_metrics([], 10).queries == 0
