"""The source's two op jobs: evaluating the freshness check of late shards without a sync, and the
full diff against the ledger (the scheduled reconcile)."""

import json
import time

import dagster as dg

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.lag_sensor import BEHIND_SINCE_TAG
from embedding_assets.defs.resources import SHARDS_TAG
from embedding_assets.ops.run_health import IN_PROCESS_JOB_TAG
from embedding_assets.sync.lag import shard_lags


def build_freshness_job(spec: SourceSpec) -> dg.JobDefinition:
    """Evaluates the `freshness` check of the shards the lag sensor names (tags), without
    materializing anything: how a shard whose rows wait shows late with no sync run."""

    @dg.op(
        name=f"{spec.name}_evaluate_freshness",
        required_resource_keys={"runtime", embedder_resource_key(spec.embedder)},
        tags={"kind": "postgres"},
    )
    def evaluate_freshness(context: dg.OpExecutionContext) -> None:
        embedder = getattr(context.resources, embedder_resource_key(spec.embedder)).embedder()
        runtime = context.resources.runtime.source(spec.name, embedder, "live")
        tags = context.run.tags
        since = {int(k): v for k, v in json.loads(tags.get(BEHIND_SINCE_TAG, "{}")).items()}
        wanted = [shard_index(k) for k in tags.get(SHARDS_TAG, "").split(",") if k]
        lags = shard_lags(runtime, since, time.time())
        for shard in wanted or range(spec.shards):
            lag = lags[shard]
            context.log_event(
                dg.AssetCheckEvaluation(
                    asset_key=dg.AssetKey([spec.name, "embeddings"]),
                    check_name="freshness",
                    passed=not lag.late,
                    partition=spec.shard_keys[shard],
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata=lag.metadata(),
                )
            )

    @dg.job(
        name=f"{spec.name}_freshness",
        executor_def=dg.in_process_executor,
        description=f"The `freshness` check of {spec.name!r}'s shards the lag sensor found "
        "late, evaluated without a sync.",
        tags={IN_PROCESS_JOB_TAG: spec.name},
    )
    def freshness_job() -> None:
        evaluate_freshness()

    return freshness_job


def build_reconcile_job(spec: SourceSpec) -> dg.JobDefinition:
    """A job that compares the whole source with the ledger and queues what differs; the
    sensor then brings those shards up to date through the normal path."""

    @dg.op(
        name=f"{spec.name}_find_missed_changes",
        required_resource_keys={"runtime", embedder_resource_key(spec.embedder)},
        tags={"kind": "postgres"},
    )
    def reconcile(context: dg.OpExecutionContext) -> dg.Output[int]:
        embedder = getattr(context.resources, embedder_resource_key(spec.embedder)).embedder()
        started = time.perf_counter()
        found, repaired = 0, 0
        # The live generation and the one being built each compare with their own ledger.
        for runtime in context.resources.runtime.generations(spec.name, embedder):
            queued, disagree = runtime.reconcile()
            found += queued
            repaired += len(disagree)
            context.log.info(
                f"reconcile of {spec.name} generation {runtime.number} ({runtime.feed.mode} "
                f"capture): {queued} rows queued; {len(disagree)} shards whose destinations "
                f"had lost data, now marked for repair: {disagree}"
            )
        seconds = time.perf_counter() - started
        null_ids = runtime.diff.null_id_rows()
        if null_ids:
            context.log.warning(
                f"{null_ids} eligible rows of {spec.name} have a NULL `{spec.id_column}` and "
                "are never embedded; give them an id, or leave them out with `where:`"
            )
        return dg.Output(
            found,
            metadata={
                "rows_found": found,
                "null_id_rows": null_ids,
                "shards_repaired": repaired,
                "change_capture": runtime.feed.mode,
                "duration_seconds": round(seconds, 3),
            },
        )

    @dg.job(
        name=f"{spec.name}_reconcile",
        executor_def=dg.in_process_executor,
        description=f"Full diff of source {spec.name!r} against the ledger: queue what the "
        "change feed missed (triggers bypassed, restores, watermark deletes).",
        tags={IN_PROCESS_JOB_TAG: spec.name},
    )
    def reconcile_job() -> None:
        reconcile()

    return reconcile_job
