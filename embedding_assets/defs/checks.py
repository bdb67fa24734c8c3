"""Asset checks of a source, per shard: vector validity, coverage, dead rows, parity with the
ledger, self-retrieval, search recall."""

from collections.abc import Callable

import dagster as dg

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.assets import source_resources
from embedding_assets.defs.resources import runtime_of
from embedding_assets.defs.shard_ranges import range_keys
from embedding_assets.destinations.recall import (
    RECALL_EVERY_SECONDS,
    RECALL_K,
    RECALL_SAMPLE,
    RECALL_TARGET,
)
from embedding_assets.sync import shard_checks
from embedding_assets.sync.runtime import SourceRuntime
from embedding_assets.sync.shard_checks import SELF_RETRIEVAL_K, SELF_RETRIEVAL_SAMPLE, CheckOutcome


def check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed, severity=check_severity(outcome), metadata=check_metadata(outcome)
    )


def evaluate_shards(
    context: dg.AssetCheckExecutionContext,
    spec: SourceSpec,
    evaluate: Callable[[SourceRuntime, int], CheckOutcome],
) -> dg.AssetCheckResult:
    """The check of the run's shard; in a run over several shards (a backfill), each shard's
    own evaluation is logged for its partition and the result sums them up."""
    runtime = runtime_of(context, spec)
    keys = range_keys(context)
    if not keys:
        return check_result(evaluate(runtime, shard_index(context.partition_key)))
    check = context.check_specs[0]
    outcomes = {key: evaluate(runtime, shard_index(key)) for key in keys}
    for key, outcome in outcomes.items():
        context.op_execution_context.log_event(
            check_evaluation(check.asset_key, check.name, key, outcome)
        )
    failed = sorted(key for key, outcome in outcomes.items() if not outcome.passed)
    return dg.AssetCheckResult(
        passed=not failed,
        severity=check_severity(next(iter(outcomes.values()))),
        metadata={"shards_in_run": len(keys), "failed_shards": dg.MetadataValue.json(failed)},
    )


def check_evaluation(
    asset_key: dg.AssetKey, check: str, partition: str, outcome: CheckOutcome
) -> dg.AssetCheckEvaluation:
    """One shard's result as an event, for a step that evaluates several shards."""
    return dg.AssetCheckEvaluation(
        asset_key=asset_key,
        check_name=check,
        passed=outcome.passed,
        severity=check_severity(outcome),
        metadata=check_metadata(outcome),
        partition=partition,
    )


def check_severity(outcome: CheckOutcome) -> dg.AssetCheckSeverity:
    return dg.AssetCheckSeverity.WARN if outcome.warn_only else dg.AssetCheckSeverity.ERROR


def check_metadata(outcome: CheckOutcome) -> dict:
    """Lists and dicts (missed rows) shown as JSON."""
    return {
        k: dg.MetadataValue.json(v) if isinstance(v, list | dict) else v
        for k, v in outcome.metadata.items()
    }


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
        return evaluate_shards(context, spec, shard_checks.vectors_valid)

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
        return evaluate_shards(context, spec, shard_checks.coverage)

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
        return evaluate_shards(context, spec, shard_checks.parity)

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
        return evaluate_shards(context, spec, shard_checks.no_dead_rows)

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
        sample = shard_checks.sample_per_shard(len(range_keys(context) or [0]))
        return evaluate_shards(
            context,
            spec,
            lambda runtime, shard: shard_checks.self_retrieval(runtime, shard, sample),
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
        return evaluate_shards(context, spec, shard_checks.search_recall)

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
        # A run of the lag sensor says since when the shard is behind.
        since = context.run.tags.get("embedding_assets/behind_since")
        behind_since = float(since) if since else None
        return evaluate_shards(
            context,
            spec,
            lambda runtime, shard: shard_checks.freshness(runtime, shard, behind_since),
        )

    return freshness
