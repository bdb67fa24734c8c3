"""Retrieval metrics of ranked row ids against the relevant ones, binary relevance, cut at k:
recall@k (the share of the relevant rows in the top k), MRR@k (1 / the rank of the first
relevant row, 0 if none in the top k) and nDCG@k (DCG of the ranking over the ideal DCG,
gain 1 per relevant row, log2 discount). Averaged over queries by `mean_metrics`."""

import math
from collections.abc import Sequence
from dataclasses import dataclass


def unique_rows(ranked: Sequence[str]) -> list[str]:
    """Ranked row ids with repeats removed (a row's several chunks count once, at its best
    rank)."""
    return list(dict.fromkeys(ranked))


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    if not relevant:
        return 0.0
    return len(set(ranked[:k]) & relevant) / len(relevant)


def mrr_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    for rank, row in enumerate(ranked[:k], start=1):
        if row in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    found = [rank for rank, row in enumerate(ranked[:k], start=1) if row in relevant]
    dcg = sum(1.0 / math.log2(rank + 1) for rank in found)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(relevant), k) + 1))
    return dcg / ideal if ideal else 0.0


@dataclass(frozen=True)
class Metrics:
    queries: int
    recall_at_k: float
    mrr_at_k: float
    ndcg_at_k: float


def mean_metrics(runs: Sequence[tuple[Sequence[str], set[str]]], k: int) -> Metrics:
    """The three metrics averaged over (ranked row ids, relevant row ids) pairs."""
    if not runs:
        return Metrics(0, 0.0, 0.0, 0.0)
    ranked = [(unique_rows(r), rel) for r, rel in runs]
    n = len(ranked)
    return Metrics(
        queries=n,
        recall_at_k=round(sum(recall_at_k(r, rel, k) for r, rel in ranked) / n, 4),
        mrr_at_k=round(sum(mrr_at_k(r, rel, k) for r, rel in ranked) / n, 4),
        ndcg_at_k=round(sum(ndcg_at_k(r, rel, k) for r, rel in ranked) / n, 4),
    )
