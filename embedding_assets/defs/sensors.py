"""The per-source sensor: one run per shard that has work, never twice for the same work,
and failed work asked for again after a growing wait (an outage must not strand rows).
Runs whose process died are failed first (`run_health`), so they hold no shard or slot."""

import json
import time
from dataclasses import dataclass

import dagster as dg

from embedding_assets.config.settings import drift
from embedding_assets.config.sources import SourceSpec
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.resources import GENERATION_TAG, SHARDS_TAG
from embedding_assets.defs.shards_job import shards_job_name
from embedding_assets.destinations.audit import audit_destinations, without_store_lock
from embedding_assets.ops.demo import DEMO_TABLE
from embedding_assets.ops.run_health import WORKER_LOST_TAG, fail_dead_runs
from embedding_assets.state.capture import SourceTableMissing
from embedding_assets.state.diff import ShardWork
from embedding_assets.state.privileges import PrivilegeError
from embedding_assets.sync.config_edits import apply_config
from embedding_assets.sync.live_pass import shards_left_to_lane
from embedding_assets.sync.outage import EmbedderHealth
from embedding_assets.sync.promotion import converge_readers, finish_build

IN_FLIGHT = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}
FAILED = {dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED}
WORK_TAG = "embedding_assets/work"
# After the n-th failed run for the same work, wait RETRY_BASE * 2**(n-1) s, at most RETRY_MAX.
RETRY_BASE_SECONDS = 60
RETRY_MAX_SECONDS = 3600
RECENT_RUNS = 1000
# How often the sensor compares the destinations with the ledger (destinations.audit).
AUDIT_INTERVAL_SECONDS = 60


def recent_runs(instance: dg.DagsterInstance, job_name: str) -> list:
    return list(
        instance.get_run_records(filters=dg.RunsFilter(job_name=job_name), limit=RECENT_RUNS)
    )


def runs_on_source(instance: dg.DagsterInstance, job_name: str, source: str) -> list:
    """Runs in flight that work on the source's shards, whatever launched them: its sync
    job (the sensor, `sync`) and any asset selection of its assets (the UI's materialize)."""
    records = instance.get_run_records(
        filters=dg.RunsFilter(statuses=list(IN_FLIGHT)), limit=RECENT_RUNS
    )
    found = []
    for record in records:
        run = record.dagster_run
        selection = run.asset_selection or set()
        ours = run.job_name in (job_name, shards_job_name(source))  # one shard, or many
        if ours or any(key.path[0] == source for key in selection):
            found.append(record)
    return found


def busy_shards(records: list) -> set[tuple[str | None, str | None]]:
    """(generation, shard) of every shard the runs in flight work on: a per-shard run's
    partition, each shard a many-shards run names."""
    busy = set()
    for record in records:
        tags = record.dagster_run.tags
        generation = tags.get(GENERATION_TAG)
        if tags.get("dagster/partition"):
            busy.add((generation, tags["dagster/partition"]))
        for key in filter(None, tags.get(SHARDS_TAG, "").split(",")):
            busy.add((generation, key))
    return busy


def shard_work_tag(key: str) -> str:
    """The tag a many-shards run carries per shard: the work it was asked for."""
    return f"{WORK_TAG}_{key}"


def worked_on(tags: dict, key: str, work_id: str) -> bool:
    """Whether a run (of one shard, or of many) was asked for this work of this shard."""
    return tags.get(WORK_TAG) == work_id or tags.get(shard_work_tag(key)) == work_id


def one_run_for(source: str, generation, requests: list[dg.RunRequest]) -> dg.RunRequest:
    """The shards' requests of one generation as one run of the many-shards job: its key
    new whenever any shard's work is, each shard's work in a tag of its own (a failure or a
    lost worker counts for the work of every shard it held)."""
    import hashlib

    keys = [r.partition_key for r in requests]
    run_key = hashlib.md5("|".join(r.run_key for r in requests).encode()).hexdigest()
    return dg.RunRequest(
        job_name=shards_job_name(source),
        run_key=f"{source}:g{generation.number}:{run_key}",
        tags={
            SHARDS_TAG: ",".join(keys),
            GENERATION_TAG: str(generation.number),
            "embedding_assets/generation_state": generation.state,
            **{shard_work_tag(r.partition_key): r.tags[WORK_TAG] for r in requests},
            "embedding_assets/pending_rows": str(
                sum(int(r.tags["embedding_assets/pending_rows"]) for r in requests)
            ),
            "embedding_assets/qdrant_lag_rows": str(
                sum(int(r.tags["embedding_assets/qdrant_lag_rows"]) for r in requests)
            ),
        },
    )


def retry_wait(failures: int) -> float:
    return min(RETRY_BASE_SECONDS * 2 ** (failures - 1), RETRY_MAX_SECONDS)


def retry_run_key(work_id: str, failed: int, lost: int) -> str:
    """A new key for each retry of the same work: after a failure, and after a run whose
    process died (retried at once)."""
    key = f"{work_id}:{failed}" if failed else work_id
    return f"{key}:lost{lost}" if lost else key


def probed_health(state: dict, embedder) -> EmbedderHealth:
    """The embedder's probes from the cursor, with a new one if work waits out a backoff
    and the embedder is a remote one (a local model has no outages to wait out)."""
    health = EmbedderHealth.from_cursor(state.get("embedder") or {})
    if state.get("backing_off") and hasattr(embedder, "answers"):
        health.probe(time.time(), embedder.answers)
    return health


def read_cursor(cursor: str | None) -> dict:
    """A sensor's JSON cursor ({} if none; an older float cursor is its audit time)."""
    if not cursor:
        return {}
    try:
        value = json.loads(cursor)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"audited_at": float(value)}


def _finished_build_note(source: str, generation) -> str:
    """What a building generation with no work left waits for, if anything."""
    if generation.promote == "manual":
        return (
            f"generation {generation.number} is built and waits for `embedding-assets "
            f"generations promote --source {source}`"
        )
    if generation.blocked_reason:
        return f"generation {generation.number} is built but not promoted: " + (
            generation.blocked_reason
        )
    return ""


def _repair_destinations(log, source: str, runtime) -> None:
    """Audit the runtime's destinations against the ledger and queue the rows they lost. Only
    while no run writes: a write half-applied is not a loss. An embedded Qdrant store is only
    checked for existence here (counting takes its lock)."""
    mode = without_store_lock(runtime)
    for audit in audit_destinations(runtime, qdrant=mode):
        if audit.repaired:
            log.warning(f"destinations of {source} disagree with the ledger: {audit}")


def tick_cursor(
    audited_at: float,
    requests: list,
    waiting: int,
    health: EmbedderHealth,
    backing_off: int,
) -> str:
    """The sensor's cursor: when it last audited, what this tick asked for, and how the
    embedder answered its probes while work waited out a backoff."""
    return json.dumps(
        {
            "audited_at": audited_at,
            "asked": len(requests),
            "waiting": waiting,
            "backing_off": backing_off,
            "embedder": health.to_cursor(),
            "pending_rows": sum(int(r.tags["embedding_assets/pending_rows"]) for r in requests),
            "at": time.time(),
        }
    )


def _lacking_privileges(runtime) -> str | None:
    """Why no run may start (the role lacks a privilege: every run would fail after paying
    for nothing), or None; checked until it passes once in this process."""
    try:
        runtime.require_privileges()
    except PrivilegeError as exc:
        return str(exc)
    return None


@dataclass(frozen=True)
class ShardDecision:
    """Whether the sensor asks for a run of a shard with work: the request, or None and why
    not; `line` says which, for the sensor's log."""

    request: dg.RunRequest | None
    line: str
    backing_off: bool = False  # no request: the work's last runs failed, its backoff runs


def shard_decision(
    source: str,
    generation,
    key: str,
    shard_work: ShardWork,
    busy: set[tuple[str | None, str | None]],
    budget_embedder: str | None,
    runs: list,
    now: float,
    health: EmbedderHealth | None = None,
) -> ShardDecision:
    """A pure function of the shard's work, the runs in flight (`busy`: (generation, shard)
    tags), the recent runs, whether the embedder's daily budget is spent (its name), the
    embedder's probes (`health`) and the time: a run request whose key is new for new work,
    or why there is none."""
    label = f"g{generation.number}"
    # A run without the tag (started from the UI) may be on any generation.
    if (str(generation.number), key) in busy or (None, key) in busy:
        return ShardDecision(None, f"{label}/{key} (run in flight)")
    if budget_embedder is not None and not shard_work.qdrant_lag_rows:
        return ShardDecision(
            None,
            f"{label}/{key} ({shard_work.pending_rows} rows wait for tomorrow's "
            f"token budget of embedder {budget_embedder!r})",
        )
    # The fingerprint changes with the outstanding work (queue entries, watermark window,
    # lagging rows): the same work never gets a second run, unless it failed.
    work_id = f"{source}:{label}:{key}:{shard_work.fingerprint}"
    failed = [
        r
        for r in runs
        if worked_on(r.dagster_run.tags, key, work_id)
        and r.dagster_run.status in FAILED
        # A run whose process died says nothing about the work: no wait for it.
        and r.dagster_run.tags.get(WORKER_LOST_TAG) != "true"
    ]
    lost = sum(
        1
        for r in runs
        if worked_on(r.dagster_run.tags, key, work_id)
        and r.dagster_run.tags.get(WORKER_LOST_TAG) == "true"
    )
    if failed:
        last = max(r.end_time or r.update_timestamp.timestamp() for r in failed)
        due = last + retry_wait(len(failed)) - now
        if due > 0 and not (health is not None and health.retry_now(last)):
            return ShardDecision(
                None, f"{label}/{key} (failed {len(failed)}x, retry in {due:.0f}s)", True
            )
    request = dg.RunRequest(
        partition_key=key,
        run_key=retry_run_key(work_id, len(failed), lost),
        tags={
            WORK_TAG: work_id,
            GENERATION_TAG: str(generation.number),
            "embedding_assets/generation_state": generation.state,
            "embedding_assets/pending_rows": str(shard_work.pending_rows),
            "embedding_assets/qdrant_lag_rows": str(shard_work.qdrant_lag_rows),
        },
    )
    return ShardDecision(
        request,
        f"{label}/{key}: {shard_work.pending_rows} rows pending, "
        f"{shard_work.qdrant_lag_rows} rows Qdrant lacks",
    )


def missing_table_reason(spec: SourceSpec, missing: SourceTableMissing) -> str:
    """Why a sensor waits for a source table not created yet; for the bundled demo's (`dg
    dev` alone loads no rows), the command that loads it."""
    demo = " (the bundled demo's rows: `embedding-assets db demo`)"
    return f"{missing}{demo if spec.table == DEMO_TABLE else ''}"


def build_sensor(spec: SourceSpec, job, shards_job) -> dg.SensorDefinition:
    embedder_key = embedder_resource_key(spec.embedder)
    keys = spec.shard_keys

    @dg.sensor(
        name=f"{spec.name}_changes",
        jobs=[job, shards_job],
        minimum_interval_seconds=spec.sensor_interval_seconds,
        default_status=dg.DefaultSensorStatus(spec.sensor_status.upper()),
        required_resource_keys={"runtime", embedder_key},
        description=(
            f"Reads {spec.name!r}'s change feed and requests one run covering every shard "
            "with new, changed or deleted rows (or points Qdrant lacks), per generation."
        ),
    )
    def source_changes(context: dg.SensorEvaluationContext):
        # A broken or edited sources.yaml: no run until the code location has the new one
        # (a run would load the file anew, fail, and push the shard into the back-off).
        problem = drift(context.resources.runtime.settings())
        if problem is not None:
            return dg.SkipReason(problem)
        dead = fail_dead_runs(context.instance)
        if dead:
            context.log.warning(f"failed {len(dead)} runs whose process is gone: {dead}")
        embedder = getattr(context.resources, embedder_key).embedder()
        # The live generation and, while one is built, the new one: each follows the feed.
        try:
            runtimes = context.resources.runtime.generations(spec.name, embedder)
        except SourceTableMissing as missing:
            return dg.SkipReason(missing_table_reason(spec, missing))
        if lacking := _lacking_privileges(runtimes[0]):
            return dg.SkipReason(lacking)
        live = next((r for r in runtimes if r.generation.state == "live"), runtimes[0])
        _keep_readers_on_live(context.log, live)
        runs = recent_runs(context.instance, job.name) + recent_runs(
            context.instance, shards_job.name
        )
        busy = busy_shards(runs_on_source(context.instance, job.name, spec.name))
        state = read_cursor(context.cursor)
        audited_at = float(state.get("audited_at", 0))
        health = probed_health(state, embedder)
        audit_due = not busy and time.time() - audited_at >= AUDIT_INTERVAL_SECONDS
        requests, waiting, notes, asked = [], [], [], []
        backing_off = 0
        for runtime in runtimes:
            generation = runtime.generation
            edit = apply_config(runtime)  # an edit of sources.yaml becomes work now
            if edit.changed:
                context.log.info(f"{spec.name} g{generation.number}: {edit.describe()}")
            if audit_due:
                _repair_destinations(context.log, spec.name, runtime)
            work = runtime.work()
            if generation.state == "building" and not any(w.has_work for w in work.values()):
                if not busy and "promoted_generation" in finish_build(runtime, context.log):
                    continue  # live now; the next tick follows it as the live generation
                notes.append(_finished_build_note(spec.name, runtime.generation))
            budget_embedder = runtime.budget.embedder if runtime.budget.left() == 0 else None
            shard_requests = []
            lane = shards_left_to_lane(runtime)  # fresh changes, while a live lane is up
            for shard, shard_work in sorted(work.items()):
                if shard in lane:
                    waiting.append(f"g{generation.number}/{keys[shard]} (left to the live lane)")
                    continue
                if not shard_work.has_work:
                    continue
                decision = shard_decision(
                    spec.name, generation, keys[shard], shard_work, busy, budget_embedder, runs,
                    time.time(), health,
                )  # fmt: skip
                backing_off += decision.backing_off
                if decision.request is None:
                    waiting.append(decision.line)
                else:
                    asked.append(decision.line)
                    shard_requests.append(decision.request)
            if shard_requests:
                requests.append(one_run_for(spec.name, generation, shard_requests))
        for line in asked:
            context.log.info(f"asked for {line}")
        for reason in waiting:
            context.log.debug(f"not asked: {reason}")  # every tick while runs are in flight
        context.update_cursor(
            tick_cursor(
                time.time() if audit_due else audited_at,
                requests,
                len(waiting),
                health,
                backing_off,
            )
        )
        if requests:
            return dg.SensorResult(run_requests=requests)
        return _skip_reason(waiting, notes, live.feed.mode)

    return source_changes


def _keep_readers_on_live(log, live) -> None:
    moved = converge_readers(
        live.engine,
        live.spec.name,
        live.stable_table,
        live.stable_collection,
        live.qdrant.store,
        live.generation,
    )
    if moved:
        log.warning(f"readers of {live.spec.name} moved to the live generation: {moved}")


def _skip_reason(waiting: list[str], notes: list[str], mode: str) -> dg.SkipReason:
    parts = [f"shards with work are waiting: {', '.join(waiting)}"] if waiting else []
    parts += [n for n in notes if n]
    if parts:
        return dg.SkipReason("; ".join(parts))
    return dg.SkipReason(f"nothing pending ({mode} capture): every shard is current")
