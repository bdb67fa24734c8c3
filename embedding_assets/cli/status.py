"""`embedding-assets status`: per source and shard, eligible, embedded and pending rows, failed and
dead rows, chunks and points; from the ledger and the change feed, or exact."""

import json

import click

from embedding_assets.cli.common import (
    ensure_database,
    generation_runtimes,
    settings_from,
    source_names,
)
from embedding_assets.cli.output import id_warnings
from embedding_assets.config.settings import Settings

STATUS_FIELDS = (
    "eligible_rows",
    "embedded_rows",
    "pending_rows",
    "failed_rows",
    "dead_rows",
    "pgvector_chunks",
    "qdrant_points",
)


def status_report(settings: Settings, source: str, exact: bool = False) -> dict:
    """Per source and shard: eligible rows, rows with a current embedding, pending rows,
    rows in the error table (waiting for a retry, dead), pgvector chunks and Qdrant points.

    Exact for diff capture or with `exact`: a full diff of the source, and the chunks and
    points counted in pgvector and Qdrant. Otherwise read from the ledger and the change
    feed, without scanning the source: `pending_rows` counts queued changes,
    `eligible_rows` is embedded + pending (an update of an embedded row counts twice until
    it is done), and `pgvector_chunks` / `qdrant_points` are what the ledger records the
    destinations hold, after the ledger was checked against pgvector's chunk counts (and
    Qdrant's, for a server). `eligible_rows_counted` is the last full diff's count, with its
    time in `counted_at`.
    """
    from embedding_assets.cli.generations import generations_report
    from embedding_assets.destinations.audit import audit_destinations, without_store_lock
    from embedding_assets.state.diff import DUPLICATE_KIND
    from embedding_assets.state.privileges import row_security
    from embedding_assets.sync.config_edits import pending_edits

    if not _registered(source):
        return _never_synced(settings, source)
    runtimes = generation_runtimes(settings, source, register=False)
    runtime = runtimes[0]  # the live generation
    spec = runtime.spec
    is_exact = exact or runtime.feed.mode == "diff"
    # First make the ledger honest about what the destinations hold (a TRUNCATE or a
    # removed store turns into rows to restore), so no row is reported as embedded that a
    # destination lacks. An embedded Qdrant store is counted only by --exact (its lock).
    audit_destinations(
        runtime, qdrant="count" if is_exact else without_store_lock(runtime), deep=is_exact
    )
    errors = runtime.errors.counts_by_shard()
    shards = _exact_shards(runtime) if is_exact else _ledger_shards(runtime)
    for index, key in enumerate(spec.shard_keys):
        failed, dead = errors.get(index, (0, 0))
        shards[key].update(failed_rows=failed, dead_rows=dead)
    totals = {f: sum(s[f] for s in shards.values()) for f in STATUS_FIELDS}
    counted = runtime.diff.counted()
    edits = pending_edits(runtime)
    with runtime.engine.connect() as conn:
        security = row_security(conn, spec)
    if edits is not None and _new_pipeline(settings, source, runtimes):
        edits = {"pipeline": "reembed", **edits}  # the next sync registers a new generation
    return {
        "null_id_rows": runtime.diff.null_id_rows(),
        "duplicate_ids": runtime.errors.ids_of_kind(DUPLICATE_KIND),
        "source": source,
        "pgvector_table": ".".join(runtime.stable_table),
        "qdrant_collection": runtime.stable_collection,
        "generation": runtime.number,
        "model": runtime.model_id,
        "generations": generations_report(settings, source, runtimes),
        "token_budget": runtime.budget.describe(),
        **totals,
        # Rows with a vector in the write-back column (None: the source has none).
        "column_rows": runtime.column.count() if runtime.column is not None else None,
        "change_capture": runtime.feed.mode,
        # Keys edited in sources.yaml since the store was last brought in line (applied by
        # the next sync, sensor tick or run), with their effect; None: nothing recorded yet.
        "config_changes": {k: str(v) for k, v in edits.items()} if edits is not None else None,
        # Row-level security on the source or write-back table, and whether this role
        # bypasses it ([] when off).
        "row_level_security": security,
        "exact": is_exact,
        # The live lane serving this source, one moment of it: up / down / none.
        "live_lane": _lane(runtime),
        "eligible_rows_counted": counted[0],
        "counted_at": counted[1],
        "shards": shards,
    }


@click.command()
@click.option("--source", help="Only this source (default: all).")
@click.option(
    "--exact",
    is_flag=True,
    help="Compare the whole source with the ledger (a full scan) instead of reading the "
    "ledger and the change feed.",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, source: str | None, exact: bool, as_json: bool) -> None:
    """Per source and shard: eligible, embedded and pending rows, chunks and points."""
    from embedding_assets.cli.output import generation_line
    from embedding_assets.state.privileges import describe_row_security

    settings = settings_from(ctx)  # a bad sources file fails before a database is started
    ensure_database()
    reports = [status_report(settings, name, exact) for name in source_names(settings, source)]
    if as_json:
        click.echo(json.dumps(reports, default=str))
        return
    for line in unconfigured_leftovers(settings):
        click.echo(f"WARNING: {line}")
    for report in reports:
        if report.get("synced") is False:
            click.echo(
                f"{report['source']}: {report['eligible_rows']} eligible rows; {report['note']}"
            )
            continue
        click.echo(
            f"{report['source']} -> {report['pgvector_table']} / "
            f"qdrant:{report['qdrant_collection']}  ({report['change_capture']} capture)"
        )
        click.echo(f"  {'shard':>5} " + " ".join(f"{f:>15}" for f in STATUS_FIELDS))
        for key, shard in report["shards"].items():
            click.echo(f"  {key:>5} " + " ".join(f"{shard[f]:>15}" for f in STATUS_FIELDS))
        click.echo(f"  {'total':>5} " + " ".join(f"{report[f]:>15}" for f in STATUS_FIELDS))
        if report["config_changes"]:
            edited = ", ".join(f"{k} ({v})" for k, v in report["config_changes"].items())
            click.echo(
                f"  PENDING EDIT: {edited} changed in sources.yaml; the next sync (or sensor "
                "tick) applies it: the counts above are from before it"
            )
        for entry in report["row_level_security"]:
            click.echo(f"  NOTE: {describe_row_security(entry, settings.source(report['source']))}")
        for warning in id_warnings(report, settings.source(report["source"]).id_column):
            click.echo(f"  WARNING: {warning}")
        for generation in report["generations"]:
            click.echo(f"  {generation_line(generation)}")
        click.echo(f"  {lane_line(report['live_lane'])}")
        budget = report["token_budget"]
        if budget["spent"]:
            click.echo(
                f"  WAITING: the daily token budget of embedder {budget['embedder']!r} is "
                f"spent ({budget['tokens_used_today']:,} of {budget['max_tokens_per_day']:,} "
                "tokens today, UTC); pending rows wait for tomorrow, nothing fails"
            )
        if not report["exact"]:
            counted = report["eligible_rows_counted"]
            when = report["counted_at"] or "never"
            click.echo(
                "  from the ledger and the change feed, not a scan: eligible = embedded + "
                "queued changes; chunks and points are what the ledger records. Last full "
                f"count: {counted if counted is not None else '-'} eligible rows ({when}). "
                "`status --exact` scans the source and counts both sinks."
            )


def _lane(runtime) -> dict:
    from dataclasses import asdict

    from embedding_assets.sync.live_pass import source_lane

    lane = source_lane(runtime)
    return {"state": "off"} if lane.state == "off" else asdict(lane)


def lane_line(lane: dict) -> str:
    """The live lane in one line of `status`."""
    if lane["state"] == "off":
        return "live lane: off for this source (the sensor's runs write its changes)"
    if lane["state"] == "none":
        return "live lane: not started (`embedding-assets live`); the sensor's runs write"
    if lane["state"] == "down":
        return (
            f"live lane: DOWN (last heartbeat {lane['heartbeat_age_seconds']} s ago); the "
            "sensor's runs write until it is back"
        )
    wrote = lane["last_write_age_seconds"]
    return (
        f"live lane: up ({lane['lane']}), {lane['rows_written']} rows written, last "
        f"{'never' if wrote is None else f'{wrote} s ago'}, {lane['backlog']} held"
        + (f"; last error: {lane['last_error']}" if lane["last_error"] else "")
    )


def _new_pipeline(settings: Settings, source: str, runtimes: list) -> bool:
    """Whether the configured model, template, chunking or Qdrant lexical side has no
    generation yet (the next sync registers and builds one)."""
    from embedding_assets.embedders.build import make_embedder
    from embedding_assets.state.generations import Generations
    from embedding_assets.sync.generations import configured_generation

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    model_id = make_embedder(embedder_spec).model_id
    registry = Generations(runtimes[0].engine, source).all()
    store = runtimes[0].qdrant.store
    return configured_generation(registry, spec, embedder_spec, model_id, store) is None


def _registered(source: str) -> bool:
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import Generations

    return bool(Generations(engine_for(database_url()), source).all())


def _never_synced(settings: Settings, source: str) -> dict:
    """A configured source with no store yet: reported without creating one (status writes
    nothing; the first sync, run or sensor tick sets capture up)."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.diff import SourceDiff

    spec = settings.source(source)
    work = SourceDiff(engine_for(database_url()), spec, spec.target, "").exact_work(remember=False)
    shards = {
        key: {
            **dict.fromkeys(STATUS_FIELDS, 0),
            "eligible_rows": work[index].eligible_rows,
            "pending_rows": work[index].pending_rows,
        }
        for index, key in enumerate(spec.shard_keys)
    }
    return {
        "source": source,
        "synced": False,
        "pgvector_table": ".".join(spec.pg_table),
        "qdrant_collection": spec.qdrant_collection,
        "note": f"never synced: `embedding-assets sync --source {source}` (or the sensor in "
        "`dev`) creates its store and sets change capture up",
        **{f: sum(s[f] for s in shards.values()) for f in STATUS_FIELDS},
        "config_changes": None,
        "exact": True,
        "shards": shards,
    }


def unconfigured_leftovers(settings: Settings) -> list[str]:
    """What sources no longer in sources.yaml left behind (triggers, queues), described."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.leftovers import leftovers

    configured = {s.name for s in settings.sources}
    return [found.describe() for found in leftovers(engine_for(database_url()), configured)]


def _exact_shards(runtime) -> dict[str, dict[str, int]]:
    """Per shard, by a full diff of the source and counting both sinks."""
    spec = runtime.spec
    work = runtime.exact_work()
    chunks = runtime.pgvector.chunk_counts() if spec.pgvector.enabled else {}
    points = dict.fromkeys(range(spec.shards), 0)
    if spec.qdrant.enabled:
        with runtime.qdrant.store.session(runtime.qdrant.collection):
            points = {index: runtime.qdrant.count(index) for index in range(spec.shards)}
    return {
        key: {
            "eligible_rows": work[index].eligible_rows,
            "embedded_rows": work[index].embedded_rows,
            "pending_rows": work[index].pending_rows,
            "pgvector_chunks": chunks.get(index, 0),
            "qdrant_points": points[index],
        }
        for index, key in enumerate(spec.shard_keys)
    }


def _ledger_shards(runtime) -> dict[str, dict[str, int]]:
    """Per shard, from the ledger and the change feed (no scan of the source)."""
    spec = runtime.spec
    work = runtime.work(ensure=False)
    held = runtime.ledger.holdings_by_shard()
    shards = {}
    for index, key in enumerate(spec.shard_keys):
        current, chunks, points = held.get(index, (0, 0, 0))
        shards[key] = {
            "eligible_rows": current + work[index].pending_rows,
            "embedded_rows": current,
            "pending_rows": work[index].pending_rows,
            "pgvector_chunks": chunks if spec.pgvector.enabled else 0,
            "qdrant_points": points if spec.qdrant.enabled else 0,
        }
    return shards
