"""Reciprocal rank fusion: one ranking from several, each hit scoring Σ weight / (k + rank)
over the rankings it is in, ranks counted from 0 (as Qdrant counts them).

The same formula serves pgvector (in SQL, `destinations.lexical.hybrid_sql`) and Qdrant (here,
over its dense and sparse top candidates), so a row gets the same fused score from both.

Why k = 10 and not the paper's 60, and the lexical side's weight above 1: a known item (a
package's name, a few rare words of its text) is usually first or second in the lexical
ranking and far down the dense one; with k = 60 every hit that both rankings place in their
middle outscores it. On 300 description-word queries over 5,000 PyPI rows
(benchmarks/search_quality.py), k = 60 with equal weights put hybrid recall@10 below
lexical alone on both backends (pgvector 0.963 vs 0.970, Qdrant 0.980 vs 0.990); k = 10 with
weight 1.5 reached at least the better side on each half of the queries and on both
backends, and raised name-query MRR@10 too.
"""

from collections.abc import Hashable, Sequence
from typing import TypeVar

RRF_K = 10
Id = TypeVar("Id", bound=Hashable)


def candidates(limit: int) -> int:
    """How many hits each side of a hybrid search ranks before fusion."""
    return max(4 * limit, 40)


def fuse(
    rankings: Sequence[tuple[Sequence[Id], float]], limit: int, k: int = RRF_K
) -> list[tuple[Id, float]]:
    """The top `limit` of (id, fused score), best first; ties by id. Each ranking is (ids best
    first, its weight); an id listed twice in one ranking counts at its first rank."""
    scores: dict[Id, float] = {}
    for ids, weight in rankings:
        seen: set[Id] = set()
        for rank, hit in enumerate(ids):
            if hit in seen:
                continue
            seen.add(hit)
            scores[hit] = scores.get(hit, 0.0) + weight / (k + rank)
    ordered = sorted(scores.items(), key=lambda item: (-item[1], str(item[0])))
    return ordered[:limit]
