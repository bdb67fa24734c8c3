"""The checks of one shard as plain functions: what each asset check of a source evaluates,
so a run of one shard (its asset checks) and a run of many (`defs/shards_job.py`) report the
same results. Each returns a `CheckOutcome`; the Dagster wrappers turn it into a result or
an evaluation event of the shard's partition."""

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from embedding_assets.destinations.audit import audit_destinations
from embedding_assets.destinations.recall import RECALL_K, RECALL_TARGET, measured_recall
from embedding_assets.sync.lag import shard_lags
from embedding_assets.sync.runtime import SourceRuntime

SELF_RETRIEVAL_SAMPLE = 10
SELF_RETRIEVAL_SECONDS_PER_RUN = 5.0  # a many-shards run's searches for self-retrieval
SELF_RETRIEVAL_K = 5


@dataclass(frozen=True)
class CheckOutcome:
    passed: bool
    metadata: dict[str, Any] = field(default_factory=dict)
    warn_only: bool = False  # a failure warns (AssetCheckSeverity.WARN) instead of erring


def vectors_valid(
    runtime: SourceRuntime, shard: int, rows: Sequence[str] | None = None
) -> CheckOutcome:
    """The shard's stored vectors; a run of many shards checks the rows it wrote (`rows`),
    so the check costs what the run changed: vectors only change when written."""
    dimension = runtime.embedder.dimension
    if runtime.spec.pgvector.enabled:
        found = runtime.pgvector.invalid_vectors(shard, dimension, rows)
    else:  # the column's type fixes the dimension; a held row must have its vector
        found = runtime.column.invalid_vectors(shard, runtime.is_live)
    passed = not any(found.get(k) for k in ("wrong_dimension", "zero_norm", "missing_vectors"))
    scope = {"scope": "shard" if rows is None or not runtime.spec.pgvector.enabled else "run"}
    return CheckOutcome(passed, {**found, "dimension": dimension, **scope})


def coverage(runtime: SourceRuntime, shard: int) -> CheckOutcome:
    if runtime.feed.mode == "diff":
        work = runtime.exact_work(shard)[shard]
        embedded, eligible, pending = work.embedded_rows, work.eligible_rows, work.pending_rows
    else:
        embedded = runtime.ledger.current_rows_by_shard(shard).get(shard, 0)
        # The change feed alone (not Qdrant's lag), installed and requeued by the run's read.
        pending = runtime.feed.work(ensure=False).get(shard, (0, None))[0]
        failed = sum(runtime.errors.counts_by_shard().get(shard, (0, 0)))
        # Queued rows may be updates of embedded ones: a lower bound.
        eligible = embedded + pending + failed
    ratio = embedded / eligible if eligible else 1.0
    metadata = {
        "coverage": round(min(ratio, 1.0), 4),
        "eligible_rows": eligible,
        "embedded_rows": embedded,
        "pending_rows": pending,
        "exact": runtime.feed.mode == "diff",
    }
    return CheckOutcome(ratio >= 1.0, metadata, warn_only=True)


def parity(runtime: SourceRuntime, shard: int, deep: bool = True) -> CheckOutcome:
    """Counts against the ledger; `deep` also compares checksums of every chunk (O(shard)):
    a run of many shards leaves that to a run of one shard, the sensor's audit and
    `reconcile`."""
    found = audit_destinations(runtime, qdrant="count", shard=shard, deep=deep)
    if not found:
        return CheckOutcome(True, {"ledger_chunks": 0})
    audit = found[0]
    return CheckOutcome(
        audit.consistent,
        {
            "ledger_chunks": audit.ledger_chunks,
            "pgvector_chunks": audit.pgvector_chunks,
            "ledger_points": audit.ledger_points,
            "qdrant_points": audit.qdrant_points or 0,
            "rows_marked_for_restore": audit.rows_marked_lost,
            "stray_chunks_removed": audit.orphan_chunks_removed,
            "qdrant_shard_resent": audit.qdrant_forgotten,
            "deep": deep,
        },
    )


def no_dead_rows(runtime: SourceRuntime, shard: int) -> CheckOutcome:
    failed, dead = runtime.errors.counts_by_shard().get(shard, (0, 0))
    return CheckOutcome(
        dead == 0, {"dead_rows": dead, "rows_waiting_for_retry": failed}, warn_only=True
    )


class SearchBudget:
    """The seconds a run of many shards may spend on sampled searches (self-retrieval): once
    spent, the remaining shards sample nothing and say so, so checks never make a large
    run slow. Plain: `spend` is told what each shard's searches took."""

    def __init__(self, seconds: float | None = None):
        self.seconds = SELF_RETRIEVAL_SECONDS_PER_RUN if seconds is None else seconds
        self.spent = 0.0

    @property
    def left(self) -> bool:
        return self.spent < self.seconds

    def spend(self, seconds: float) -> None:
        self.spent += seconds


def sample_per_shard(shards_in_run: int) -> int:
    """A run over several shards shares one sample out, so its searches stay bounded."""
    return max(2, math.ceil(SELF_RETRIEVAL_SAMPLE / max(shards_in_run, 1)))


def self_retrieval(
    runtime: SourceRuntime,
    shard: int,
    sample_size: int = SELF_RETRIEVAL_SAMPLE,
    rows: Sequence[str] | None = None,
) -> CheckOutcome:
    """`missed_rows` is a list (the wrapper shows it as JSON). A run of many shards samples
    fewer chunks per shard (`sample_size`), of the rows it wrote (`rows`), so the run's
    searches and reads stay bounded by what it changed."""
    spec = runtime.spec
    if not spec.pgvector.enabled:
        misses = runtime.column.self_retrieval_misses(
            shard, sample_size, SELF_RETRIEVAL_K, runtime.is_live
        )
        return CheckOutcome(not misses, {"missed_rows": misses, "k": SELF_RETRIEVAL_K})
    sample = runtime.pgvector.sample_chunks(shard, sample_size, rows)
    # Until the HNSW index exists (a bulk load defers it) a search is an exact scan: search
    # the shard only, so the check does not scan the whole table per sample. Qdrant's
    # embedded engine always scans: the shard filter uses its payload index.
    record = runtime.ledger.record()
    pg_shard = shard if record is None or record.vector_index != "built" else None
    found = {"pgvector": 0, "qdrant": 0}
    for row in sample.itertuples(index=False):
        pg_hits = runtime.pgvector.search(row.embedding, SELF_RETRIEVAL_K, pg_shard)
        if any(h.point_id == row.point_id or h.text == row.chunk_text for h in pg_hits):
            found["pgvector"] += 1
        if not spec.qdrant.enabled:
            continue
        q_hits = runtime.qdrant.search(row.embedding, SELF_RETRIEVAL_K, shard)
        if any(h.id == row.point_id or h.payload.get("text") == row.chunk_text for h in q_hits):
            found["qdrant"] += 1
    sampled = len(sample)
    if not spec.qdrant.enabled:
        found.pop("qdrant")
    return CheckOutcome(
        all(count == sampled for count in found.values()),
        {"sampled": sampled, **{f"found_{k}": v for k, v in found.items()}},
    )


def search_recall(runtime: SourceRuntime, shard: int) -> CheckOutcome:
    figures, measured_at = measured_recall(runtime, shard)
    recalls = [v for k, v in figures.items() if k.endswith("_recall") and v is not None]
    return CheckOutcome(
        all(r >= RECALL_TARGET for r in recalls),
        {
            **{k: v for k, v in figures.items() if v is not None},
            "k": RECALL_K,
            "measured_at": measured_at or "now",
        },
        warn_only=True,
    )


def freshness(
    runtime: SourceRuntime, shard: int, behind_since: float | None = None
) -> CheckOutcome:
    """`behind_since`: since when the lag sensor found the shard behind (diff capture has no
    queue to date it)."""
    behind = {shard: behind_since} if behind_since else None
    lag = shard_lags(runtime, behind, time.time())[shard]
    return CheckOutcome(not lag.late, lag.metadata(), warn_only=True)


# Which checks a source has, on which of its assets, in the order a run evaluates them.
ON_EMBEDDINGS = {
    "vectors_valid": vectors_valid,
    "coverage": coverage,
    "no_dead_rows": no_dead_rows,
    "freshness": freshness,
}
ON_INDEX = {  # on vector_index; without Qdrant, on embeddings (without the Qdrant-only ones)
    "self_retrieval": self_retrieval,
    "pgvector_qdrant_parity": parity,
    "search_recall": search_recall,
}
QDRANT_ONLY = ("pgvector_qdrant_parity", "search_recall")
