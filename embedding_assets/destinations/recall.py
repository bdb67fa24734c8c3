"""Recall of the approximate searches: a sample of stored chunks, each searched through the
index and by an exact scan; recall@k is the share of the exact top k that the index also
returned. Both searches run over the whole table (pgvector) and the shard (Qdrant), as
applications search them."""

from dataclasses import dataclass

import numpy as np

RECALL_SAMPLE = 5
RECALL_K = 10
RECALL_TARGET = 0.95
# The exact searches scan the whole table: measured at most this often per target (and
# again after the index is rebuilt), the last figures reported in between.
RECALL_EVERY_SECONDS = 3600
SCORE_TOLERANCE = 1e-6  # float32 cosine noise between the two searches


@dataclass(frozen=True)
class Recall:
    backend: str
    recall: float | None  # None: nothing to sample
    exact_engine: bool = False  # the backend's search is exact; recall is 1 by construction


def recall_at_k(
    approximate: list[list[float]], exact: list[list[float]], k: int = RECALL_K
) -> float | None:
    """Mean share of each exact top k that the approximate top k matched, by score: a hit
    scoring at least the exact k-th score counts, so equally near neighbours (common among
    near-duplicates) are interchangeable. Lists are similarity scores, best first."""
    shares = []
    for found, truth in zip(approximate, exact, strict=True):
        truth = truth[:k]
        if not truth:
            continue
        kth = truth[-1] - SCORE_TOLERANCE
        shares.append(min(sum(1 for score in found[:k] if score >= kth), len(truth)) / len(truth))
    return round(float(np.mean(shares)), 4) if shares else None


def pgvector_recall(runtime, shard: int, vectors: list[np.ndarray]) -> Recall:
    """Recall of pgvector's HNSW search; exact by construction while the index is not built."""
    record = runtime.ledger.record()
    if record is None or record.vector_index != "built":
        return Recall("pgvector", 1.0 if vectors else None, exact_engine=True)
    pg = runtime.pgvector
    approximate = [[h.score for h in pg.search(v, RECALL_K)] for v in vectors]
    exact = [[h.score for h in pg.search(v, RECALL_K, exact=True)] for v in vectors]
    return Recall("pgvector", recall_at_k(approximate, exact))


def qdrant_recall(runtime, shard: int, vectors: list[np.ndarray]) -> Recall:
    qdrant = runtime.qdrant
    if qdrant.store_is_embedded:  # no HNSW graph: the embedded engine searches exactly
        return Recall("qdrant", 1.0 if vectors else None, exact_engine=True)
    approximate = [[h.score for h in qdrant.search(v, RECALL_K, shard)] for v in vectors]
    exact = [[h.score for h in qdrant.search(v, RECALL_K, shard, exact=True)] for v in vectors]
    return Recall("qdrant", recall_at_k(approximate, exact))


def measured_recall(runtime, shard: int) -> tuple[dict[str, float | bool | None], str | None]:
    """{backend_recall, backend_exact} for both backends, from a fresh measurement on a
    sample of the shard's chunks, or the target's last one if it is recent enough; and
    when the reused one was measured (None: measured now)."""
    recent = runtime.ledger.recent_recall(RECALL_EVERY_SECONDS)
    if recent is not None:
        return recent[0], recent[1]
    sample = runtime.pgvector.sample_chunks(shard, RECALL_SAMPLE)
    vectors = list(sample["embedding"])
    figures: dict[str, float | bool | None] = {}
    for measure in (pgvector_recall, qdrant_recall):
        recall = measure(runtime, shard, vectors)
        figures[f"{recall.backend}_recall"] = recall.recall
        figures[f"{recall.backend}_exact"] = recall.exact_engine
    if vectors:
        runtime.ledger.set_recall(figures)
    return figures, None
