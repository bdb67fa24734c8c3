"""Asset checks of a source, per shard: vector validity, coverage, dead rows, parity with the
ledger, self-retrieval, search recall."""

import time

import dagster as dg

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.assets import source_resources
from embedding_assets.defs.resources import runtime_of
from embedding_assets.destinations.audit import audit_destinations
from embedding_assets.destinations.recall import (
    RECALL_EVERY_SECONDS,
    RECALL_K,
    RECALL_SAMPLE,
    RECALL_TARGET,
    measured_recall,
)
from embedding_assets.sync.lag import shard_lags

SELF_RETRIEVAL_SAMPLE = 10
SELF_RETRIEVAL_K = 5


def build_checks(
    spec: SourceSpec,
    shards: dg.PartitionsDefinition,
    embeddings: dg.AssetsDefinition,
    vector_index: dg.AssetsDefinition | None,
) -> list[dg.AssetChecksDefinition]:
    """`vector_index` is None for a source without Qdrant: the checks that compare with
    Qdrant go, and self-retrieval checks what the source has (pgvector or the column)."""
    vectors_valid = build_vectors_valid(spec, shards, embeddings)
    coverage = build_coverage(spec, shards, embeddings)
    parity = build_parity(spec, shards, vector_index or embeddings)
    no_dead_rows = build_no_dead_rows(spec, shards, embeddings)
    self_retrieval = build_self_retrieval(spec, shards, vector_index or embeddings)
    search_recall = build_search_recall(spec, shards, vector_index or embeddings)
    freshness = build_freshness(spec, shards, embeddings)

    with_qdrant = [parity, search_recall] if vector_index is not None else []
    return [vectors_valid, coverage, no_dead_rows, self_retrieval, freshness, *with_qdrant]


def build_vectors_valid(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="vectors_valid",
        blocking=True,
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description="Every stored vector of the shard has the model's dimension and a "
        "non-zero norm (pgvector itself rejects NaN). Blocks the Qdrant write if not.",
    )
    def vectors_valid(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        embedder = runtime.embedder
        shard = shard_index(context.partition_key)
        if spec.pgvector.enabled:
            found = runtime.pgvector.invalid_vectors(shard, embedder.dimension)
        else:  # the column's type fixes the dimension; a held row must have its vector
            found = runtime.column.invalid_vectors(shard, runtime.is_live)
        passed = not any(found.get(k) for k in ("wrong_dimension", "zero_norm", "missing_vectors"))
        return dg.AssetCheckResult(
            passed=passed, metadata={**found, "dimension": embedder.dimension}
        )

    return vectors_valid


def build_coverage(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="coverage",
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description="Eligible source rows of the shard with a current embedding, divided by "
        "eligible rows. Below 1.0 while a backlog, new changes or failed rows wait. "
        "Exact (a diff of the shard) for diff capture; for trigger and watermark capture, "
        "estimated from the ledger and the change feed without scanning the source.",
    )
    def coverage(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        shard = shard_index(context.partition_key)
        if runtime.feed.mode == "diff":
            work = runtime.exact_work(shard)[shard]
            embedded, eligible, pending = work.embedded_rows, work.eligible_rows, work.pending_rows
        else:
            embedded = runtime.ledger.current_rows_by_shard(shard).get(shard, 0)
            pending = runtime.work()[shard].pending_rows
            failed = sum(runtime.errors.counts_by_shard().get(shard, (0, 0)))
            # Queued rows may be updates of embedded ones: a lower bound.
            eligible = embedded + pending + failed
        ratio = embedded / eligible if eligible else 1.0
        return dg.AssetCheckResult(
            passed=ratio >= 1.0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                "coverage": round(min(ratio, 1.0), 4),
                "eligible_rows": eligible,
                "embedded_rows": embedded,
                "pending_rows": pending,
                "exact": runtime.feed.mode == "diff",
            },
        )

    return coverage


def build_parity(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,  # left out below without Qdrant
        name="pgvector_qdrant_parity",
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description="The shard's chunks in pgvector and points in Qdrant are as many as the "
        "ledger records. A destination that lost data (a TRUNCATE, rows deleted by hand, a "
        "removed store) fails this check and is marked for repair: the next run restores it "
        "(from the other destination's vectors where they exist).",
    )
    def parity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        shard = shard_index(context.partition_key)
        found = audit_destinations(runtime, qdrant="count", shard=shard, deep=True)
        if not found:
            return dg.AssetCheckResult(passed=True, metadata={"ledger_chunks": 0})
        audit = found[0]
        return dg.AssetCheckResult(
            passed=audit.consistent,
            metadata={
                "ledger_chunks": audit.ledger_chunks,
                "pgvector_chunks": audit.pgvector_chunks,
                "ledger_points": audit.ledger_points,
                "qdrant_points": audit.qdrant_points or 0,
                "rows_marked_for_restore": audit.rows_marked_lost,
                "stray_chunks_removed": audit.orphan_chunks_removed,
                "qdrant_shard_resent": audit.qdrant_forgotten,
            },
        )

    return parity


def build_no_dead_rows(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="no_dead_rows",
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description="No row of the shard is dead in the error table: failed "
        "`retries.max_attempts` times with the same content. `embedding-assets errors "
        "--dead` lists them with the provider's reason; `errors replay` tries them again.",
    )
    def no_dead_rows(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        shard = shard_index(context.partition_key)
        failed, dead = runtime.errors.counts_by_shard().get(shard, (0, 0))
        return dg.AssetCheckResult(
            passed=dead == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"dead_rows": dead, "rows_waiting_for_retry": failed},
        )

    return no_dead_rows


def build_self_retrieval(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="self_retrieval",
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description=f"A sample of {SELF_RETRIEVAL_SAMPLE} stored chunks each find themselves "
        f"(or an identical text) in their top {SELF_RETRIEVAL_K}, in pgvector (the whole "
        "table once its HNSW index is built, the shard before) and in the shard's Qdrant "
        "points; for a column-only source, sampled rows find themselves in the column.",
    )
    def self_retrieval(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        shard = shard_index(context.partition_key)
        if not spec.pgvector.enabled:
            misses = runtime.column.self_retrieval_misses(
                shard, SELF_RETRIEVAL_SAMPLE, SELF_RETRIEVAL_K, runtime.is_live
            )
            return dg.AssetCheckResult(
                passed=not misses,
                metadata={"missed_rows": dg.MetadataValue.json(misses), "k": SELF_RETRIEVAL_K},
            )
        sample = runtime.pgvector.sample_chunks(shard, SELF_RETRIEVAL_SAMPLE)
        # Until the HNSW index exists (a bulk load defers it) a search is an exact scan:
        # search the shard only, so the check does not scan the whole table per sample.
        # Qdrant's embedded engine always scans: the shard filter uses its payload index.
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
        return dg.AssetCheckResult(
            passed=all(count == sampled for count in found.values()),
            metadata={"sampled": sampled, **{f"found_{k}": v for k, v in found.items()}},
        )

    return self_retrieval


def build_search_recall(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,  # left out below without Qdrant
        name="search_recall",
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description=f"recall@{RECALL_K} of the approximate searches against exact ones, for "
        f"{RECALL_SAMPLE} stored chunks of the shard used as queries: pgvector's HNSW index "
        "over the whole table, and the shard's Qdrant points. Warns below "
        f"{RECALL_TARGET}: raise `pgvector.hnsw.ef_search` / `qdrant.hnsw.ef_search`. An "
        "exact backend (no HNSW index yet, or Qdrant's embedded engine) has recall 1. The "
        f"exact searches scan the table, so a target is measured at most every "
        f"{RECALL_EVERY_SECONDS // 60} min (and after its index is rebuilt); runs in "
        "between report the last figures and when they were measured.",
    )
    def search_recall(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        figures, measured_at = measured_recall(runtime, shard_index(context.partition_key))
        recalls = [v for k, v in figures.items() if k.endswith("_recall") and v is not None]
        return dg.AssetCheckResult(
            passed=all(r >= RECALL_TARGET for r in recalls),
            severity=dg.AssetCheckSeverity.WARN,
            metadata={
                **{k: v for k, v in figures.items() if v is not None},
                "k": RECALL_K,
                "measured_at": measured_at or "now",
            },
        )

    return search_recall


def build_freshness(
    spec: SourceSpec, shards: dg.PartitionsDefinition, asset: dg.AssetsDefinition
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=asset,
        name="freshness",
        partitions_def=shards,
        required_resource_keys=source_resources(spec),
        description=f"No change of the shard has waited longer than `freshness_seconds` "
        f"({spec.freshness_seconds} s) to reach both sinks. Evaluated after each run and, "
        f"without any run (the sensor off, runs failing), by the `{spec.name}_lag` sensor, "
        "which also records the shard's pending rows as observations the UI plots.",
    )
    def freshness(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        runtime = runtime_of(context, spec)
        shard = shard_index(context.partition_key)
        # A run of the lag sensor says since when the shard is behind (diff capture has
        # no queue to date it).
        since = context.run.tags.get("embedding_assets/behind_since")
        behind = {shard: float(since)} if since else None
        lag = shard_lags(runtime, behind, time.time())[shard]
        return dg.AssetCheckResult(
            passed=not lag.late, severity=dg.AssetCheckSeverity.WARN, metadata=lag.metadata()
        )

    return freshness
