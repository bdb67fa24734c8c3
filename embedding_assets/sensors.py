"""The per-source sensor: one run per shard that has work, never twice for the same work."""

import dagster as dg

from embedding_assets.resources.embedders import embedder_resource_key
from embedding_assets.runtime import store_for
from embedding_assets.settings import SourceSpec

IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def shards_in_flight(instance: dg.DagsterInstance, job_name: str) -> set[str]:
    records = instance.get_run_records(
        filters=dg.RunsFilter(job_name=job_name, statuses=IN_FLIGHT), limit=1000
    )
    return {r.dagster_run.tags.get("dagster/partition", "") for r in records}


def build_sensor(spec: SourceSpec, job) -> dg.SensorDefinition:
    embedder_key = embedder_resource_key(spec.embedder)
    keys = spec.shard_keys

    @dg.sensor(
        name=f"{spec.name}_changes",
        job=job,
        minimum_interval_seconds=spec.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"database", embedder_key},
        description=(
            f"Compares {spec.name!r} with what is stored and requests one run per shard with "
            "new, changed or deleted rows (or points Qdrant lacks)."
        ),
    )
    def source_changes(context: dg.SensorEvaluationContext):
        embedder = getattr(context.resources, embedder_key).embedder()
        store = store_for(spec, context.resources.database.url, embedder)
        work = store.work_by_shard()
        busy = shards_in_flight(context.instance, job.name)
        requests = []
        waiting = []
        for shard, shard_work in sorted(work.items()):
            key = keys[shard]
            if not shard_work.has_work:
                continue
            if key in busy:
                waiting.append(key)
                continue
            requests.append(
                dg.RunRequest(
                    partition_key=key,
                    # The fingerprint covers the pending rows' ids, hashes and last write
                    # times: the same outstanding work never gets a second run.
                    run_key=f"{spec.name}:{key}:{shard_work.fingerprint}",
                    tags={
                        "embedding_assets/pending_rows": str(shard_work.pending_rows),
                        "embedding_assets/qdrant_lag_rows": str(shard_work.qdrant_lag_rows),
                    },
                )
            )
        if not requests:
            pending = sum(w.pending_rows for w in work.values())
            if waiting:
                return dg.SkipReason(
                    f"shards {waiting} have work but a run of theirs is still in flight"
                )
            return dg.SkipReason(
                f"nothing pending: {pending} rows to embed, "
                f"{sum(w.eligible_rows for w in work.values())} eligible rows all current"
            )
        return dg.SensorResult(run_requests=requests)

    return source_changes
