"""build_source_defs(spec): everything one configured source adds to the code location: its
assets, checks, sync job, op jobs, sensors and reconcile schedule."""

from dataclasses import dataclass

import dagster as dg

from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec
from embedding_assets.defs.assets import (
    build_chunks,
    build_embeddings,
    build_pending_rows,
    build_vector_index,
)
from embedding_assets.defs.checks import build_checks
from embedding_assets.defs.jobs import build_freshness_job, build_reconcile_job
from embedding_assets.defs.lag_sensor import build_lag_sensor
from embedding_assets.defs.metadata import sink_metadata, source_asset
from embedding_assets.defs.sensors import build_sensor
from embedding_assets.defs.shards_job import build_shards_job
from embedding_assets.ops.run_health import IN_PROCESS_JOB_TAG


@dataclass
class SourceDefs:
    assets: list[dg.AssetsDefinition | dg.AssetSpec]
    checks: list[dg.AssetChecksDefinition]
    jobs: list  # what dg.define_asset_job returns (resolved when Definitions load)
    sensor: dg.SensorDefinition
    lag_sensor: dg.SensorDefinition
    reconcile_job: dg.JobDefinition
    schedules: list[dg.ScheduleDefinition]


def build_source_defs(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    qdrant_url: str | None,
    qdrant_path: str,
) -> SourceDefs:
    name = spec.name
    shards = dg.StaticPartitionsDefinition(spec.shard_keys)
    source = source_asset(spec)
    sinks = sink_metadata(spec, embedder_spec, qdrant_url, qdrant_path)

    pending_rows = build_pending_rows(spec, shards)
    chunks = build_chunks(spec, embedder_spec, shards)
    embeddings = build_embeddings(spec, embedder_spec, shards, sinks["embeddings"])
    vector_index = build_vector_index(spec, shards, embeddings, sinks["vector_index"], qdrant_url)

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
    shards_job = build_shards_job(spec, qdrant_url)
    sensor = build_sensor(spec, job, shards_job)
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
        [job, shards_job, freshness_job],
        sensor,
        build_lag_sensor(spec, freshness_job),
        reconcile_job,
        schedules,
    )
