"""build_source_defs(spec): the assets, checks, job and sensor of one configured source."""

import json
import time
from dataclasses import dataclass, replace

import dagster as dg

from embedding_assets.asset_metadata import (
    common_attributes,
    embedder_kind,
    sink_metadata,
    source_asset,
    staging_tags,
)
from embedding_assets.checks import build_checks
from embedding_assets.core.delta import ChunkedRows, EmbeddedRows, IndexUpdate, PendingRows
from embedding_assets.core.sharding import shard_index
from embedding_assets.lag import shard_lags
from embedding_assets.pipeline import (
    chunk_rows,
    effective_max_tokens,
    embed_chunks,
    fit_token_budget,
    reusable_vectors,
)
from embedding_assets.resources.embedders import embedder_pool, embedder_resource_key
from embedding_assets.resources.runtime import runtime_of
from embedding_assets.run_health import IN_PROCESS_JOB_TAG
from embedding_assets.sensors import BEHIND_SINCE_TAG, SHARDS_TAG, build_lag_sensor, build_sensor
from embedding_assets.settings import EmbedderSpec, SourceSpec

EMBEDDED_QDRANT_POOL = "qdrant_embedded"


@dataclass
class SourceDefs:
    assets: list[dg.AssetsDefinition | dg.AssetSpec]
    checks: list[dg.AssetChecksDefinition]
    jobs: list  # what dg.define_asset_job returns (resolved when Definitions load)
    sensor: dg.SensorDefinition
    lag_sensor: dg.SensorDefinition
    reconcile_job: dg.JobDefinition
    schedules: list[dg.ScheduleDefinition]


def embedder_stats(embedder) -> dict[str, float]:
    """Cumulative request counters of a remote embedder ({} for a local model)."""
    stats = getattr(embedder, "stats", None)
    return dict(stats()) if stats else {}


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This run's share: requests, retries, throttled seconds, tokens, provider usage."""
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    # Counters stay integers (the UI plots 3.0 requests otherwise); waits keep decimals.
    return {
        f"embedder_{k}": int(v) if float(v).is_integer() else round(v, 3) for k, v in delta.items()
    }


def generation_metadata(runtime) -> dict[str, object]:
    """Which generation a step worked on: the UI shows a build's progress by it."""
    generation = runtime.generation
    if generation is None:
        return {}
    # Text, not numbers: a constant is not a series to plot.
    return {
        "generation": dg.MetadataValue.text(str(generation.number)),
        "generation_state": generation.state,
    }


def _per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def build_source_defs(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    qdrant_url: str | None,
    qdrant_path: str,
) -> SourceDefs:
    name = spec.name
    shards = dg.StaticPartitionsDefinition(spec.shard_keys)
    resources = {"runtime", embedder_resource_key(spec.embedder)}
    source = source_asset(spec)
    sinks = sink_metadata(spec, embedder_spec, qdrant_url, qdrant_path)
    common = common_attributes(spec)

    @dg.asset(
        key=[name, "pending_rows"],
        group_name=name,
        kinds={"postgres", "pandas"},
        partitions_def=shards,
        io_manager_key="staging_io_manager",
        required_resource_keys=resources,
        deps=[source.key],
        owners=spec.owners,
        tags=staging_tags(spec),
    )
    def pending_rows(context: dg.AssetExecutionContext) -> PendingRows:
        """Rows of this shard that need work now: new or changed rows (their text, metadata
        or the model differs from what is stored) and rows to remove (deleted, or no longer
        matching `where`). At most `max_rows_per_run`; the sensor asks again for the rest."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec)
        shard = shard_index(context.partition_key)
        runtime.claim_shard(
            shard,
            on_wait=lambda: context.log.info(
                f"shard {context.partition_key} is being synced by another run; waiting for "
                "its write, so no row is embedded twice"
            ),
        )
        pending = replace(
            runtime.feed.pending(shard, spec.max_rows_per_run), generation=runtime.number
        )
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "rows": len(pending.rows),
                "rows_to_delete": len(pending.deleted),
                "empty_text_rows": pending.empty_rows,
                "backlog": pending.backlog,
                "change_capture": runtime.feed.mode,
                **generation_metadata(runtime),
                "feed_entries": len(pending.consumed),
                "duration_seconds": round(seconds, 3),
            }
        )
        return pending

    @dg.asset(
        key=[name, "chunks"],
        group_name=name,
        kinds={"python", embedder_kind(embedder_spec)},
        partitions_def=shards,
        io_manager_key="staging_io_manager",
        required_resource_keys=resources,
        owners=spec.owners,
        tags=staging_tags(spec),
    )
    def chunks(context: dg.AssetExecutionContext, pending_rows: PendingRows) -> ChunkedRows:
        """Each pending row's text split into chunks of at most `max_tokens` tokens of the
        embedder's own tokenizer, overlapping by `overlap` tokens, with a content hash per
        chunk. Rows with NULL or blank text get no chunk."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec, pending_rows.generation)
        embedder = runtime.embedder
        chunked = chunk_rows(pending_rows, runtime.spec, embedder)
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "rows": len(pending_rows.rows),
                "chunks": len(chunked.chunks),
                "tokens": chunked.tokens,
                "max_tokens": effective_max_tokens(runtime.spec, embedder),
                "empty_text_rows": pending_rows.empty_rows,
                "duration_seconds": round(seconds, 3),
                "rows_per_second": _per_second(len(pending_rows.rows), seconds),
            }
        )
        return chunked

    @dg.asset(
        key=[name, "embeddings"],
        group_name=name,
        kinds={"pgvector", embedder_kind(embedder_spec)},
        partitions_def=shards,
        io_manager_key="pgvector_io_manager",
        required_resource_keys=resources,
        pool=embedder_pool(spec.embedder),
        metadata=sinks["embeddings"],
        **common,
    )
    def embeddings(context: dg.AssetExecutionContext, chunks: ChunkedRows) -> EmbeddedRows:
        """One vector per chunk, stored in the source's pgvector table. A chunk whose text
        already has a vector for this model is copied, not re-embedded: only changed
        chunks cost compute."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec, chunks.pending.generation)
        embedder = runtime.embedder
        reusable = reusable_vectors(runtime, chunks)
        calls_before = embedder_stats(embedder)
        tokens_left = runtime.budget.left()
        deferred: list[str] = []
        if tokens_left is not None:
            chunks, deferred = fit_token_budget(chunks, reusable, embedder.dimension, tokens_left)
            if deferred:
                context.log.warning(
                    f"{len(deferred)} rows wait for tomorrow's token budget of embedder "
                    f"{runtime.budget.embedder!r} ({runtime.budget.per_day:,} tokens per UTC "
                    f"day, {tokens_left:,} left): they stay pending, nothing fails"
                )

        def keep_progress(hashes: list[str], vectors, done: int, total: int) -> None:
            # Committed at once: a run interrupted after this keeps these vectors.
            runtime.vector_cache.save(hashes, vectors)
            context.log.info(f"embedded {done:,} of {total:,} new chunks (progress kept)")

        embedded = embed_chunks(chunks, embedder, reusable, keep_progress)
        runtime.budget.spend(embedded.embedded_tokens)
        seconds = time.perf_counter() - started
        rows = len(chunks.pending.rows)
        reasons = {
            row: f"{failure.kind}: {failure.message}" for row, failure in embedded.failures.items()
        }
        if reasons:
            context.log.warning(
                f"{len(reasons)} rows failed and are recorded in the error table (retried "
                f"later; `embedding-assets errors --source {name}` lists them): "
                + "; ".join(f"{row}: {why}" for row, why in list(reasons.items())[:5])
            )
        context.add_output_metadata(
            {
                **stats_delta(calls_before, embedder_stats(embedder)),
                "failed_rows": len(embedded.failures),
                "failed_row_reasons": dg.MetadataValue.json(dict(list(reasons.items())[:50])),
                **generation_metadata(runtime),
                "rows": rows,
                "chunks": len(chunks.chunks),
                "tokens": chunks.tokens,
                "embedded_chunks": embedded.embedded_chunks,
                "embedded_tokens": embedded.embedded_tokens,
                "reused_chunks": embedded.reused_chunks,
                "rows_waiting_for_token_budget": len(deferred),
                "duration_seconds": round(seconds, 3),
                "rows_per_second": _per_second(rows, seconds),
            }
        )
        return embedded

    @dg.asset(
        key=[name, "vector_index"],
        group_name=name,
        kinds={"qdrant"},
        partitions_def=shards,
        io_manager_key="qdrant_io_manager",
        required_resource_keys=resources,
        deps=[embeddings],
        pool=None if qdrant_url else EMBEDDED_QDRANT_POOL,
        metadata=sinks["vector_index"],
        **common,
    )
    def vector_index(context: dg.AssetExecutionContext) -> IndexUpdate:
        """The shard's chunks as points in the source's Qdrant collection (payload: row id,
        chunk index, text, metadata columns). Planned from what pgvector and the ledger
        hold, not from this run's output, so a crash between the two writes converges."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec)
        update, stats = runtime.qdrant.plan(
            shard_index(context.partition_key),
            runtime.embedder.dimension,
            spec.max_rows_per_run,
            runtime.model_id,
        )
        update.generation = runtime.number
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "rows": stats.lag_rows,
                "reconciled_shard": stats.reconciled,
                "created_collection": stats.created_collection,
                "backlog": update.backlog,
                **generation_metadata(runtime),
                "planning_duration_seconds": round(seconds, 3),
            }
        )
        return update

    # Without Qdrant (`qdrant: false`) the shard's sync ends with `embeddings`.
    index = [vector_index] if spec.qdrant.enabled else []
    assets = [source, pending_rows, chunks, embeddings, *index]
    checks = build_checks(spec, shards, embeddings, vector_index if index else None)
    sinks_named = " and ".join(
        what
        for what, on in (
            ("pgvector", spec.pgvector.enabled),
            ("Qdrant", spec.qdrant.enabled),
            ("the write-back column", spec.write_back is not None),
        )
        if on
    )
    job = dg.define_asset_job(
        name=f"{name}_sync",
        selection=dg.AssetSelection.assets(pending_rows, chunks, embeddings, *index),
        partitions_def=shards,
        executor_def=dg.in_process_executor,
        description=f"Bring one shard of source {name!r} up to date in {sinks_named}.",
        tags={IN_PROCESS_JOB_TAG: name},
    )
    sensor = build_sensor(spec, job)
    freshness_job = build_freshness_job(spec)
    reconcile_job = build_reconcile_job(spec)
    schedules = []
    if spec.reconcile.cron:
        schedules.append(
            dg.ScheduleDefinition(
                name=f"{name}_reconcile_schedule",
                job=reconcile_job,
                cron_schedule=spec.reconcile.cron,
                execution_timezone=spec.reconcile.timezone,
                default_status=dg.DefaultScheduleStatus.RUNNING,
                description=f"The full diff of {name!r} against the ledger, on a schedule: "
                "queues whatever the change feed missed.",
            )
        )
    return SourceDefs(
        assets,
        checks,
        [job, freshness_job],
        sensor,
        build_lag_sensor(spec, freshness_job),
        reconcile_job,
        schedules,
    )


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
