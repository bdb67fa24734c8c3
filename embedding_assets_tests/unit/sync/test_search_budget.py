"""A many-shards run's budget for sampled searches."""

from embedding_assets.sync.shard_checks import SearchBudget


def test_a_search_budget_lasts_until_its_seconds_are_spent():
    budget = SearchBudget(1.0)
    assert budget.left
    budget.spend(0.6)
    assert budget.left
    budget.spend(0.5)
    assert not budget.left
    assert not SearchBudget(0.0).left
