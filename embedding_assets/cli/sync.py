"""`embedding-assets sync`: every shard with work (or all) materialized in this process, recorded
in the UI's instance, with a line per shard run."""

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
    of its live generation and, while one is built, of the new one.

    A shard with a backlog (more than `max_rows_per_run` rows of work) runs again until it
    is done or a run makes no progress. Without `every_shard`, shards whose change feed and
    Qdrant lag show no work are skipped (the feed makes asking cheap).
    """
    from embedding_assets.definitions import build_definitions
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
    job = build_definitions(settings).resolve_job_def(f"{source}_sync")
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
        for key in keys:
            while True:
                report, backlog = _run_shard(job, source, key, instance, generation)
                reports.append(report)
                progress = report.rows or report.rows_deleted or report.points_upserted
                if not (report.success and backlog and progress):
                    break
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


def _run_shard(job, source: str, key: str, instance, generation=None) -> tuple[ShardReport, bool]:
    import uuid

    from embedding_assets.defs.resources import GENERATION_TAG
    from embedding_assets.ops.run_health import worker_tag

    started = time.perf_counter()
    run_id = str(uuid.uuid4())
    RUN_IN_PROGRESS["id"] = run_id
    result = job.execute_in_process(
        partition_key=key,
        instance=instance,
        raise_on_error=False,
        run_id=run_id,
        # A later sync fails this run if this process dies.
        tags={
            **worker_tag(run_id),
            **({GENERATION_TAG: str(generation.number)} if generation is not None else {}),
        },
    )
    report = ShardReport(
        source, key, result.success, seconds=round(time.perf_counter() - started, 2)
    )
    if generation is not None:
        report.generation, report.generation_state = generation.number, generation.state
    backlog = waiting_for_budget = False
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        meta = {k: v.value for k, v in mat.metadata.items()}
        stage = mat.asset_key.path[-1]
        if stage == "pending_rows":
            report.rows, report.rows_deleted = meta["rows"], meta["rows_to_delete"]
            backlog = backlog or bool(meta.get("backlog"))
        elif stage == "embeddings":
            report.chunks = meta["chunks"]
            report.embedded_chunks = meta["embedded_chunks"]
            report.reused_chunks = meta["reused_chunks"]
            report.failed_rows = meta.get("failed_rows", 0) + meta.get(
                "rows_refused_by_destinations", 0
            )
            report.index_build_seconds = meta.get("index_build_duration_seconds", 0.0)
            report.rows_waiting_for_budget = meta.get("rows_waiting_for_token_budget", 0)
            # The day's token budget is spent: running again would take nothing.
            waiting_for_budget = bool(report.rows_waiting_for_budget)
        if stage == "vector_index":
            report.points_upserted = meta.get("points_upserted", 0)
            backlog = backlog or bool(meta.get("backlog"))
        if stage in ("embeddings", "vector_index"):  # the last step promotes (no Qdrant: this)
            report.promoted_generation = meta.get("promoted_generation")
            report.promotion_blocked = meta.get("promotion_blocked")
    if not result.success:
        report.error = failure_cause(result.all_events)
    return report, backlog and not waiting_for_budget


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
    per shard with work (again while a backlog remains)."""
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
