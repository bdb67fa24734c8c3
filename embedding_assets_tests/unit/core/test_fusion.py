import pytest

from embedding_assets.core.fusion import RRF_K, candidates, fuse


def test_a_hit_in_both_rankings_sums_its_weighted_reciprocal_ranks() -> None:
    fused = dict(fuse([(["a", "b", "c"], 1.0), (["c", "d"], 1.5)], 10))
    assert fused["c"] == pytest.approx(1 / (RRF_K + 2) + 1.5 / RRF_K)
    assert fused["a"] == pytest.approx(1 / RRF_K)
    assert fused["d"] == pytest.approx(1.5 / (RRF_K + 1))


def test_a_known_item_first_lexically_beats_hits_both_sides_rank_in_the_middle() -> None:
    dense = [f"x{i}" for i in range(40)]
    # Ten hits ranked 10-19 by both sides, and the known item first lexically only.
    lexical = ["known", *(f"y{i}" for i in range(9)), *dense[10:20]]
    assert fuse([(dense, 1.0), (lexical, 1.5)], 10)[0][0] == "known"
    # With the paper's k = 60 and equal weights, they outscore it.
    assert fuse([(dense, 1.0), (lexical, 1.0)], 10, k=60)[0][0] != "known"


def test_order_is_by_score_then_id_and_limited() -> None:
    fused = fuse([(["b", "a"], 1.0), (["a", "b"], 1.0)], 1)
    assert fused == [("a", pytest.approx(1 / RRF_K + 1 / (RRF_K + 1)))]
    assert fuse([([], 1.0)], 5) == []


def test_an_id_repeated_in_one_ranking_counts_once_at_its_best_rank() -> None:
    assert dict(fuse([(["a", "a"], 1.0)], 5))["a"] == pytest.approx(1 / RRF_K)


def test_candidates_are_four_times_the_limit_and_at_least_forty() -> None:
    assert candidates(3) == 40 and candidates(25) == 100
