"""`embedding-assets sync`: every shard with work (or all) materialized in this process, recorded
in the UI's instance, with a line per shard: one run (the `<source>_sync_shards` job) per
generation covers every shard with work."""

import json
import os
import sys
import time
from dataclasses import asdict

import click

from embedding_assets.cli.common import ensure_database, settings_from, source_names
from embedding_assets.cli.output import ShardReport, describe_audit, shard_line
from embedding_assets.cli.sync_process import (
    RUN_IN_PROGRESS,
    preload_local_models,
    require_reachable_embedders,
    run_interruptible,
)
from embedding_assets.config.settings import Settings


def sync_source(
    settings: Settings, source: str, shard: str | None, instance, every_shard: bool = True
) -> list[ShardReport]:
    """Materialize every shard (or one) of a source in this process, recorded in `instance`:
    of its live generation and, while one is built, of the new one; one run per generation
    covers all its shards (each shard has its own events and checks).

    Shards with a backlog (more than `max_rows_per_run` rows of work) run again, in one more
    run, until they are done or make no progress. Without `every_shard`, shards whose change
    feed and Qdrant lag show no work are skipped (the feed makes asking cheap).
    """
    from embedding_assets.definitions import build_definitions
    from embedding_assets.defs.shards_job import shards_job_name
    from embedding_assets.embedders.build import make_embedder
    from embedding_assets.ops.environment import database_url, qdrant_store_from_env
    from embedding_assets.sync.generations import all_runtimes

    spec = settings.source(source)
    if shard is not None and shard not in spec.shard_keys:
        raise click.ClickException(f"source {source!r} has shards {spec.shard_keys}, not {shard!r}")
    embedder_spec = settings.embedder_for(spec)
    runtimes = all_runtimes(
        spec,
        embedder_spec,
        make_embedder(embedder_spec),
        database_url(),
        qdrant_store_from_env(),
    )
    job = build_definitions(settings).resolve_job_def(shards_job_name(source))
    reports = []
    for runtime in runtimes:
        reports.extend(_sync_generation(runtime, job, source, shard, instance, every_shard))
    return reports


def _sync_generation(
    runtime, job, source: str, shard: str | None, instance, every_shard: bool
) -> list[ShardReport]:
    from embedding_assets.destinations.audit import audit_destinations, without_store_lock
    from embedding_assets.ops.environment import qdrant_store_from_env
    from embedding_assets.sync.config_edits import apply_config

    spec = runtime.spec
    keys = [shard] if shard else spec.shard_keys
    # An edit of sources.yaml (or of the table's row-level security) becomes work first.
    edit = apply_config(runtime, force=True)
    if edit.changed:
        click.echo(f"{source} g{runtime.number}: {edit.describe()}", err=True)
    # A destination that lost data (TRUNCATE, a removed Qdrant store) becomes work here.
    # An embedded store is only checked for existence (counting waits for its lock); each
    # shard run counts its own points, and `--all-shards` runs every shard.
    for audit in audit_destinations(runtime, qdrant=without_store_lock(runtime), deep=True):
        if audit.repaired:
            click.echo(
                f"{source}/{spec.shard_keys[audit.shard]}: {describe_audit(audit)}", err=True
            )
    if not every_shard:
        work = runtime.work()
        keys = [key for key in keys if work[spec.shard_keys.index(key)].has_work]
    generation = runtime.generation
    reports = []
    # Every run of this sync shares one opening of an embedded Qdrant collection.
    with qdrant_store_from_env().keep_open():
        # One run for every shard with work; again for the shards a backlog remains in.
        while keys:
            done = _run_shards(job, source, keys, instance, generation)
            reports.extend(report for report, _ in done)
            keys = [
                report.shard
                for report, backlog in done
                if report.success
                and backlog
                and (report.rows or report.rows_deleted or report.points_upserted)
            ]
        _finish_build(runtime, source)
    return reports


def _finish_build(runtime, source: str) -> None:
    """A build whose rows are all stored goes live here, even when no shard had work (its
    last run's promotion was cut off, or a rollback target was already current)."""
    from embedding_assets.sync.promotion import finish_build

    try:
        outcome = finish_build(runtime)
    except Exception as exc:  # the runs' results stand; the next sync or tick tries again
        click.echo(f"{source}: generation {runtime.number} not finished yet: {exc}", err=True)
        return
    if "promoted_generation" in outcome:
        click.echo(
            f"{source}: generation {outcome['promoted_generation']} is complete and passed "
            "its checks: it is live now",
            err=True,
        )
    elif "promotion_blocked" in outcome:
        click.echo(
            f"{source}: generation {runtime.number} is complete but not promoted: "
            f"{outcome['promotion_blocked']}",
            err=True,
        )


def _run_shards(
    job, source: str, keys: list[str], instance, generation=None
) -> list[tuple[ShardReport, bool]]:
    """One run of the source's shards job over `keys`; per shard its report (from that
    shard's events) and whether a backlog remains."""
    import uuid

    from embedding_assets.defs.resources import GENERATION_TAG, SHARDS_TAG
    from embedding_assets.ops.run_health import worker_tag

    started = time.perf_counter()
    run_id = str(uuid.uuid4())
    RUN_IN_PROGRESS["id"] = run_id
    result = job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        run_id=run_id,
        # A later sync fails this run if this process dies.
        tags={
            **worker_tag(run_id),
            SHARDS_TAG: ",".join(keys),
            **({GENERATION_TAG: str(generation.number)} if generation is not None else {}),
        },
    )
    by_shard: dict[str, dict[str, dict]] = {key: {} for key in keys}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.partition in by_shard:
            meta = {k: v.value for k, v in mat.metadata.items()}
            by_shard[mat.partition][mat.asset_key.path[-1]] = meta
    failed = failed_shards(result.all_events) if not result.success else {}
    seconds = round((time.perf_counter() - started) / max(len(keys), 1), 2)
    done = []
    for key in keys:
        report, backlog = shard_report(source, key, by_shard[key], generation, seconds)
        if not result.success and (key in failed or not failed):
            report.success = False
            report.error = failed.get(key) or failure_cause(result.all_events)
        done.append((report, backlog))
    return done


def shard_report(
    source: str, key: str, stages: dict[str, dict], generation, seconds: float
) -> tuple[ShardReport, bool]:
    """A shard's report from the figures of its stages' events; and whether a backlog
    remains (not when the day's token budget is spent: running again would take nothing)."""
    report = ShardReport(source, key, True, seconds=seconds)
    if generation is not None:
        report.generation, report.generation_state = generation.number, generation.state
    pending, embeddings = stages.get("pending_rows", {}), stages.get("embeddings", {})
    index = stages.get("vector_index", {})
    report.rows, report.rows_deleted = pending.get("rows", 0), pending.get("rows_to_delete", 0)
    report.chunks = embeddings.get("chunks", 0)
    report.embedded_chunks = embeddings.get("embedded_chunks", 0)
    report.reused_chunks = embeddings.get("reused_chunks", 0)
    report.failed_rows = embeddings.get("failed_rows", 0) + embeddings.get(
        "rows_refused_by_destinations", 0
    )
    report.index_build_seconds = embeddings.get("index_build_duration_seconds", 0.0)
    report.rows_waiting_for_budget = embeddings.get("rows_waiting_for_token_budget", 0)
    report.points_upserted = index.get("points_upserted", 0)
    last = index or embeddings  # the last step promotes (no Qdrant: embeddings)
    report.promoted_generation = last.get("promoted_generation")
    report.promotion_blocked = last.get("promotion_blocked")
    backlog = bool(pending.get("backlog")) or bool(index.get("backlog"))
    return report, backlog and not report.rows_waiting_for_budget


def failed_shards(events) -> dict[str, str]:
    """{shard key: cause} of a shards run's failure (its failure metadata), {} if none."""
    from embedding_assets.defs.shards_job import FAILED_SHARDS

    for event in events:
        data = getattr(event.event_specific_data, "user_failure_data", None)
        if event.is_failure and data is not None and FAILED_SHARDS in (data.metadata or {}):
            return dict(data.metadata[FAILED_SHARDS].value)
    return {}


def require_source_privileges(settings: Settings, names: list[str]) -> None:
    """Every privilege the sources need, checked before anything is embedded: a missing
    one stops the sync with the SQL that grants it (`embedding-assets doctor` lists all)."""
    from embedding_assets.ops.environment import database_url, instance_storage_shared
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.privileges import require_privileges

    shared = instance_storage_shared()
    for name in names:
        require_privileges(engine_for(database_url()), settings.source(name), shared)


def failure_cause(events) -> str:
    """The exception message at the root of a failed run, not Dagster's step wrapper."""
    for event in events:
        if not event.is_failure:
            continue
        error = getattr(event.event_specific_data, "error", None)
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            # The first line: SQLAlchemy appends the statement and a link after it.
            first = (error.message.strip().splitlines() or [""])[0]
            return f"{error.cls_name}: {first}"
        return event.message or "run failed"
    return "run failed"


@click.command()
@click.option("--source", help="Only this source (default: all).")
@click.option("--shard", help="Only this shard key, e.g. 03 (default: all).")
@click.option(
    "--all-shards",
    is_flag=True,
    help="Run every shard, even those the change feed shows no work for (each run also "
    "checks its Qdrant point count against the ledger).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def sync(
    ctx: click.Context, source: str | None, shard: str | None, all_shards: bool, as_json: bool
) -> None:
    """Bring sources up to date now, in this process, recorded in the UI's instance: one run
    covering every shard with work (again for the shards a backlog remains in)."""
    import dagster as dg

    from embedding_assets.ops.environment import prepare_dagster_home
    from embedding_assets.ops.instance_connections import pool_instance_connections
    from embedding_assets.ops.pools import apply_pool_limits, pool_limits
    from embedding_assets.ops.run_health import fail_dead_runs

    settings = settings_from(ctx)
    names = source_names(settings, source)
    preload_local_models(settings, names)  # overlaps the start-up below
    ensure_database()
    require_source_privileges(settings, names)  # before any embedder call
    require_reachable_embedders(settings, names)
    prepare_dagster_home()
    reports: list[ShardReport] = []
    with dg.DagsterInstance.get() as instance:
        pool_instance_connections(instance)
        apply_pool_limits(instance, pool_limits(settings, not os.environ.get("QDRANT_URL")))
        dead = fail_dead_runs(instance)
        if dead and not as_json:
            click.echo(
                f"failed {len(dead)} earlier runs whose process is gone (their pool slots are "
                f"free again): {', '.join(dead)}",
                err=True,
            )

        def sync_all() -> None:
            for name in names:
                for report in sync_source(
                    settings, name, shard, instance, every_shard=all_shards or shard is not None
                ):
                    reports.append(report)
                    if not as_json:
                        click.echo(shard_line(report))

        run_interruptible(sync_all, instance)
    if as_json:
        click.echo(json.dumps([asdict(r) for r in reports]))
    failed_rows = sum(r.failed_rows for r in reports)
    failed_shards = [f"{r.source}/{r.shard}" for r in reports if not r.success]
    if failed_rows and not as_json:
        click.echo(
            f"{failed_rows} rows failed to embed; they are in the error table and retried "
            "later: `embedding-assets errors` lists them with the reason.",
            err=True,
        )
    if failed_shards and not as_json:
        click.echo(f"failed shards: {', '.join(failed_shards)}", err=True)
    if failed_rows or failed_shards:
        sys.exit(1)
