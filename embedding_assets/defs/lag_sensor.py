"""The lag sensor: per shard, how far the source is behind, recorded as observations the UI plots,
and a run of the freshness check when shards turn late, with or without sync runs."""

import json
import time

import dagster as dg

from embedding_assets.config.sources import SourceSpec
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.resources import SHARDS_TAG
from embedding_assets.defs.sensors import missing_table_reason, read_cursor
from embedding_assets.state.capture import SourceTableMissing
from embedding_assets.sync.lag import shard_lags
from embedding_assets.sync.live_pass import source_lane

LAG_INTERVAL_SECONDS = 30  # at most; never more than half the freshness budget, nor under 5 s


def lag_interval_seconds(spec: SourceSpec) -> int:
    """Twice per freshness budget at least, so a shard turns late within one budget."""
    return max(5, min(LAG_INTERVAL_SECONDS, spec.freshness_seconds // 2))


# A shard whose figures did not change is reported again at most this often.
LAG_REPORT_EVERY_SECONDS = 300


BEHIND_SINCE_TAG = "embedding_assets/behind_since"  # {shard: epoch seconds}, JSON


def live_lane(runtime) -> list:
    """[state, rows written, figures] of the lane serving the source ("off" where none may)."""
    health = source_lane(runtime)
    return [health.state, health.rows_written, health.figures()]


def source_observation(runtime, lags, behind: int, late: int, lane: dict) -> dg.AssetObservation:
    """The source's totals and its live lane, all of one moment."""
    waits = [lag.oldest_pending_seconds for lag in lags if lag.oldest_pending_seconds]
    return dg.AssetObservation(
        asset_key=dg.AssetKey([runtime.spec.name, "source"]),
        metadata={
            "pending_rows": sum(lag.pending_rows for lag in lags),
            "qdrant_lag_rows": sum(lag.qdrant_lag_rows for lag in lags),
            "failed_rows": sum(lag.failed_rows for lag in lags),
            "shards_behind": behind,
            "shards_late": late,
            "oldest_pending_seconds": round(max(waits), 1) if waits else 0.0,
            "generation": dg.MetadataValue.text(str(runtime.number or "")),
            **lane,
        },
    )


def build_lag_sensor(spec: SourceSpec, freshness_job) -> dg.SensorDefinition:
    """Keeps the UI truthful while rows wait, with or without sync runs: per shard, an
    observation of `embeddings` (pending rows, rows Qdrant lacks, failed rows, the oldest
    wait) and totals on the source asset; and when shards turn late, a run that evaluates
    their `freshness` check (Dagster 1.13 stores one run-less check evaluation per
    partition only: a second one breaks its unique key, so the check goes in a run)."""
    embedder_key = embedder_resource_key(spec.embedder)
    keys = spec.shard_keys
    embeddings_key = dg.AssetKey([spec.name, "embeddings"])

    @dg.sensor(
        name=f"{spec.name}_lag",
        job=freshness_job,
        minimum_interval_seconds=lag_interval_seconds(spec),
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"runtime", embedder_key},
        description=(
            f"Records how far each shard of {spec.name!r} is behind (pending rows, the "
            "oldest wait) and runs the `freshness` check of a shard that turns late, "
            "whether or not sync runs happen."
        ),
    )
    def source_lag(context: dg.SensorEvaluationContext):
        embedder = getattr(context.resources, embedder_key).embedder()
        try:
            runtime = context.resources.runtime.source(spec.name, embedder, "live")
        except SourceTableMissing as missing:
            return dg.SkipReason(missing_table_reason(spec, missing))
        state = read_cursor(context.cursor)
        now = time.time()
        since = {int(k): v for k, v in state.get("behind_since", {}).items()}
        lags = shard_lags(runtime, since, now)
        last, reported = state.get("last", {}), state.get("reported_at", {})
        events: list = []
        turned_late: list[str] = []
        for lag in lags:
            key = keys[lag.shard]
            figures = [lag.pending_rows, lag.qdrant_lag_rows, lag.failed_rows, lag.late]
            due = lag.behind and now - reported.get(key, 0) >= LAG_REPORT_EVERY_SECONDS
            if figures != last.get(key) or due:
                events.append(
                    dg.AssetObservation(
                        asset_key=embeddings_key, partition=key, metadata=lag.metadata()
                    )
                )
                if lag.late and not (last.get(key) or [0, 0, 0, False])[3]:
                    turned_late.append(key)
                last[key], reported[key] = figures, now
            if lag.behind:
                since.setdefault(lag.shard, now)
            else:
                since.pop(lag.shard, None)
        behind = [keys[lag.shard] for lag in lags if lag.behind]
        late = [keys[lag.shard] for lag in lags if lag.late]
        pending = sum(lag.pending_rows for lag in lags)
        lane = live_lane(runtime)
        if events or lane[:2] != last.get("lane", [None, None])[:2]:
            events.append(source_observation(runtime, lags, len(behind), len(late), lane[2]))
            last["lane"] = lane[:2]
        requests = []
        if turned_late:
            dated = {str(k): v for k, v in since.items()}
            requests.append(
                dg.RunRequest(
                    run_key=f"late:{json.dumps(dated, sort_keys=True)}:{','.join(turned_late)}",
                    tags={SHARDS_TAG: ",".join(turned_late), BEHIND_SINCE_TAG: json.dumps(dated)},
                )
            )
        summary = (
            f"{len(behind)} of {len(keys)} shards behind ({pending} rows pending), "
            f"{len(late)} late: {', '.join(late) or 'none'}"
            if behind
            else "every shard is current"
        )
        context.log.info(summary)
        cursor = {
            "behind_since": {str(k): v for k, v in since.items()},
            "last": last,
            "reported_at": reported,
        }
        return dg.SensorResult(
            run_requests=requests,
            asset_events=events,
            cursor=json.dumps(cursor),
            skip_reason=None if requests else summary,
        )

    return source_lag
