"""`embedding-assets`: set-up, sync, search and status from a shell."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from embedding_assets.settings import Settings, SettingsError, load_settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _embedded():
    from embedding_assets.embedded import EmbeddedPostgres

    return EmbeddedPostgres.from_env()


def ensure_database() -> str:
    """The data database URL; starts the shared embedded server when DATABASE_URL is unset.
    A server started here keeps running: only `db stop` (or `dev`'s Ctrl-C) stops it."""
    from embedding_assets.environment import database_url, uses_embedded_postgres

    if uses_embedded_postgres() and _embedded().start():
        click.echo(f"started embedded Postgres on port {_embedded().port}", err=True)
    return database_url()


def _settings(ctx: click.Context) -> Settings:
    try:
        return load_settings(ctx.obj.get("sources"))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


def _sources(settings: Settings, name: str | None) -> list[str]:
    if name is None:
        return [s.name for s in settings.sources]
    try:
        return [settings.source(name).name]
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc


# Hints for database errors, by SQLSTATE class or code.
SQLSTATE_HINTS = {
    "42703": "a column named in sources.yaml (`text`, `metadata`, `id_column`, `where`, "
    "`watermark_column`) does not exist: fix the name, or alias it in a `query:`",
    "42P01": "a table does not exist: check `table:` / `query:` in sources.yaml and the "
    "database DATABASE_URL points at",
    "42501": "the database role lacks a privilege: grant it, or use another DATABASE_URL",
    "28": "the database refused the login: check the user and password in DATABASE_URL",
    "3D000": "the database does not exist: create it or fix DATABASE_URL",
}


def database_error_message(exc: Exception) -> str:
    """One line naming the cause and the fix, for a SQLAlchemy/driver error."""
    orig = getattr(exc, "orig", None) or exc
    sqlstate = getattr(orig, "sqlstate", None) or ""
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    hint = SQLSTATE_HINTS.get(sqlstate) or SQLSTATE_HINTS.get(sqlstate[:2])
    if hint is None and not sqlstate:
        hint = (
            "is the database running and reachable? Check DATABASE_URL "
            "(unset, the embedded server is used: `embedding-assets db start`)"
        )
    return f"database error: {first}" + (f" ({hint})" if hint else "")


class _Commands(click.Group):
    """Errors reach the user as one line naming the problem and the fix, not a traceback
    (`--debug` shows the traceback)."""

    def invoke(self, ctx: click.Context):
        import sqlalchemy.exc

        from embedding_assets.state.diff import SourceColumnsError
        from embedding_assets.state.ledger import ModelMismatchError
        from embedding_assets.state.triggers import TriggerPrivilegeError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if isinstance(exc, sqlalchemy.exc.DBAPIError):
                message = database_error_message(exc)
            elif isinstance(
                exc, (LookupError, SourceColumnsError, ModelMismatchError, TriggerPrivilegeError)
            ):
                message = str(exc.args[0] if exc.args else exc)
            else:
                message = f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
            raise click.ClickException(message) from exc


@click.group(cls=_Commands)
@click.option(
    "--sources",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EMBEDDING_ASSETS_SOURCES",
    help="sources.yaml (default: $EMBEDDING_ASSETS_SOURCES, else the bundled demo).",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def main(ctx: click.Context, sources: Path | None, debug: bool) -> None:
    """Keep embeddings of PostgreSQL rows in sync in pgvector and Qdrant, with Dagster."""
    ctx.ensure_object(dict)
    ctx.obj["sources"] = sources
    ctx.obj["debug"] = debug


# -- db -------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """The embedded PostgreSQL server (data under $EMBEDDING_ASSETS_HOME)."""


@db.command("start")
def db_start() -> None:
    """Start the shared server (no-op if it runs)."""
    server = _embedded()
    started = server.start()
    click.echo(("started" if started else "already running") + f": {server.url()}")


@db.command("stop")
def db_stop() -> None:
    """Stop the shared server."""
    click.echo("stopped" if _embedded().stop() else "not running")


@db.command("status")
@click.option("--json", "as_json", is_flag=True)
def db_status(as_json: bool) -> None:
    """Whether the server runs, its pid, port and folders."""
    status = _embedded().status()
    if as_json:
        click.echo(json.dumps(status))
    else:
        for key, value in status.items():
            click.echo(f"{key}: {value}")
    sys.exit(0 if status["running"] else 1)


@db.command("url")
@click.option("--dagster", is_flag=True, help="The Dagster instance database instead.")
def db_url(dagster: bool) -> None:
    """A URL for SQLAlchemy and psql."""
    from embedding_assets.embedded import DAGSTER_DATABASE, DATA_DATABASE

    click.echo(_embedded().url(DAGSTER_DATABASE if dagster else DATA_DATABASE))


# -- sync -----------------------------------------------------------------------------


@dataclass
class ShardReport:
    source: str
    shard: str
    success: bool
    rows: int = 0
    rows_deleted: int = 0
    chunks: int = 0
    embedded_chunks: int = 0
    reused_chunks: int = 0
    points_upserted: int = 0
    failed_rows: int = 0  # rows the embedder failed on: in the error table, retried later
    rows_waiting_for_budget: int = 0  # left pending: the embedder's daily tokens are spent
    seconds: float = 0.0
    index_build_seconds: float = 0.0  # the pgvector HNSW build after a bulk load, if this run
    error: str | None = None
    generation: int | None = None
    generation_state: str | None = None  # before the run: live, building (a build's runs)
    promoted_generation: int | None = None  # this run finished a build that went live
    promotion_blocked: str | None = None


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
    from embedding_assets.environment import database_url
    from embedding_assets.generations import all_runtimes
    from embedding_assets.runtime import make_embedder, qdrant_store_from_env

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
    from embedding_assets.runtime import qdrant_store_from_env

    spec = runtime.spec
    keys = [shard] if shard else spec.shard_keys
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
    return reports


def describe_audit(audit) -> str:
    parts = []
    if not audit.pgvector_consistent:
        parts.append(
            f"pgvector holds {audit.pgvector_chunks} chunks, the ledger {audit.ledger_chunks} "
            f"({audit.rows_marked_lost} rows to restore, {audit.orphan_chunks_removed} stray "
            "chunks removed)"
        )
    if audit.qdrant_points is not None and audit.qdrant_points != audit.ledger_points:
        parts.append(
            f"Qdrant holds {audit.qdrant_points} of {audit.ledger_points} points (shard resent)"
        )
    return "; ".join(parts)


def _run_shard(job, source: str, key: str, instance, generation=None) -> tuple[ShardReport, bool]:
    import uuid

    from embedding_assets.resources.runtime import GENERATION_TAG
    from embedding_assets.run_health import worker_tag

    started = time.perf_counter()
    run_id = str(uuid.uuid4())
    _RUN_IN_PROGRESS["id"] = run_id
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
            report.failed_rows = meta.get("failed_rows", 0)
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


@main.command()
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

    from embedding_assets.environment import prepare_dagster_home
    from embedding_assets.instance_connections import pool_instance_connections
    from embedding_assets.pools import apply_pool_limits, pool_limits
    from embedding_assets.run_health import fail_dead_runs

    settings = _settings(ctx)
    names = _sources(settings, source)
    preload_local_models(settings, names)  # overlaps the start-up below
    ensure_database()
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


_RUN_IN_PROGRESS: dict[str, str] = {}  # the run this process executes now, for a signal


def run_interruptible(work, instance) -> None:
    """Run `work` (shard runs) off the main thread, so Dagster does not take over SIGINT, and
    make SIGINT and SIGTERM stop the sync at once: the run in progress is marked failed and
    its pool slots are freed before the process exits. Every stage is crash-safe (the next
    sync or the sensor finishes the work), so stopping mid-run loses nothing."""
    import threading

    failure: list[BaseException] = []
    terminal = os.dup(2)  # stderr as it is now, before Dagster captures a run's output

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised on the main thread
            failure.append(exc)

    def stop(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        run_id = _RUN_IN_PROGRESS.get("id")
        if run_id:
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                instance.report_run_failed(run, f"embedding-assets sync stopped by {name}")
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        message = (
            f"sync stopped by {name}"
            + (f"; run {run_id} marked failed and its pool slots freed" if run_id else "")
            + ". Nothing is lost: the next sync (or the sensor) finishes the work.\n"
        )
        os.write(terminal, message.encode())  # fd 2 may be a run's captured log now
        os._exit(128 + signum)

    thread = threading.Thread(target=target, name="embedding-assets-sync", daemon=True)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(terminal)
    if failure:
        raise failure[0]


def shard_line(report: ShardReport) -> str:
    if not report.success:
        status = f"FAILED: {report.error}"
    elif report.failed_rows:
        status = f"{report.failed_rows} rows FAILED (see `embedding-assets errors`)"
    else:
        status = "ok"
    if report.rows_waiting_for_budget:
        status += (
            f"; {report.rows_waiting_for_budget} rows wait for the embedder's daily token "
            "budget (pending, not failed)"
        )
    if report.promoted_generation is not None:
        status += f"; generation {report.promoted_generation} is live now"
    elif report.promotion_blocked:
        status += f"; generation {report.generation} is not promoted: {report.promotion_blocked}"
    building = f" [building g{report.generation}]" if report.generation_state == "building" else ""
    return (
        f"{report.source}/{report.shard}{building}: {report.rows} rows, "
        f"{report.rows_deleted} deleted, "
        f"{report.chunks} chunks ({report.embedded_chunks} embedded, {report.reused_chunks} "
        f"reused), {report.points_upserted} points, {report.seconds}s  {status}"
    )


def preload_local_models(settings: Settings, sources: list[str]) -> None:
    """Start loading the in-process models of these sources in the background."""
    from embedding_assets.runtime import make_embedder

    for name in sources:
        embedder = make_embedder(settings.embedder_for(settings.source(name)))
        load = getattr(embedder, "load_in_background", None)
        if load is not None:
            load()


def require_reachable_embedders(settings: Settings, sources: list[str]) -> None:
    """Fail in a second, not after minutes of retries, when no endpoint of a remote
    embedder accepts connections (the usual cause: the local worker is not running)."""
    import socket
    from urllib.parse import urlsplit

    for name in sources:
        spec = settings.embedder_for(settings.source(name))
        urls = getattr(spec, "base_urls", ())
        if not urls:
            continue
        for url in urls:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                socket.create_connection((parts.hostname, port), timeout=3).close()
                break
            except OSError:
                continue
        else:
            hint = (
                " Start the local inference worker with `embedding-assets serve` "
                "(`make dev` starts it)."
                if any(worker_url() == u for u in urls)
                else ""
            )
            raise click.ClickException(
                f"source {name!r} embeds through {', '.join(urls)}, and none of them accepts "
                f"connections.{hint}"
            )


# -- search ---------------------------------------------------------------------------


def search_source(
    settings: Settings, source: str, text: str, limit: int, backend: str, exact: bool = False
) -> list[dict]:
    """Nearest chunks to `text` in the live generation (with its model, whatever
    sources.yaml says now): row id, score (cosine similarity), chunk text. With the
    `column` backend, nearest rows by their write-back vector, with the row's text."""
    from embedding_assets.environment import database_url
    from embedding_assets.runtime import runtime_for

    runtime = runtime_for(settings, source, database_url(), "live")
    if backend == "column":
        if runtime.column is None:
            raise click.ClickException(
                f"source {source!r} has no write_back column: add `write_back: {{column: "
                "embedding}` to it in sources.yaml, or search --backend pgvector or qdrant"
            )
        return runtime.column.search(runtime.embedder.embed_query(text), limit, exact=exact)
    if not getattr(runtime.spec, backend).enabled:  # pgvector: false or qdrant: false
        raise click.ClickException(
            f"source {source!r} has `{backend}: false`: search --backend "
            + ("column" if runtime.column is not None else "pgvector")
        )
    if not runtime.pgvector.table_exists():
        raise click.ClickException(
            f"source {source!r} has no embeddings yet (its pgvector table "
            f"{runtime.pgvector.table} does not exist): run `embedding-assets sync` first"
        )
    vector = runtime.embedder.embed_query(text)
    if backend == "pgvector":
        hits = runtime.pgvector.search(vector, limit, exact=exact)
        return [
            {"row_id": h.row_id, "chunk_index": h.chunk_index, "score": h.score, "text": h.text}
            for h in hits
        ]
    return [
        {
            "row_id": h.payload.get("row_id"),
            "chunk_index": h.payload.get("chunk_index"),
            "score": h.score,
            "text": h.payload.get("text"),
        }
        for h in runtime.qdrant.search(vector, limit, exact=exact)
    ]


@main.command()
@click.argument("text")
@click.option("--source", help="Source to search (default: the first one).")
@click.option("-k", "limit", default=5, show_default=True, type=click.IntRange(1, 1000))
@click.option(
    "--backend",
    type=click.Choice(["pgvector", "qdrant", "column"]),
    default="pgvector",
    help="column: the write-back column (one vector per row).",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Compare the query with every stored chunk instead of searching the HNSW index "
    "(slower; the ground truth for the index's recall).",
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def search(
    ctx: click.Context,
    text: str,
    source: str | None,
    limit: int,
    backend: str,
    exact: bool,
    as_json: bool,
) -> None:
    """Nearest chunks to TEXT, with row id and score."""
    ensure_database()
    settings = _settings(ctx)
    name = _sources(settings, source)[0]
    hits = search_source(settings, name, text, limit, backend, exact)
    if as_json:
        click.echo(json.dumps(hits))
        return
    for hit in hits:
        click.echo(f"{hit['score']:.4f}  {hit['row_id']}  {hit['text']}")


# -- status ---------------------------------------------------------------------------

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
    from embedding_assets.destinations.audit import audit_destinations, without_store_lock
    from embedding_assets.generations_cli import generations_report
    from embedding_assets.state.diff import DUPLICATE_KIND

    runtimes = generation_runtimes(settings, source)
    runtime = runtimes[0]  # the live generation
    spec = runtime.spec
    runtime.feed.ensure()
    is_exact = exact or runtime.feed.mode == "diff"
    # First make the ledger honest about what the destinations hold (a TRUNCATE or a
    # removed store turns into rows to restore), so no row is reported as embedded that a
    # destination lacks. An embedded Qdrant store is counted only by --exact (its lock).
    audit_destinations(
        runtime, qdrant="count" if is_exact else without_store_lock(runtime), deep=is_exact
    )
    errors = runtime.errors.counts_by_shard()
    shards = {}
    if is_exact:
        work = runtime.exact_work()
        chunks = runtime.pgvector.chunk_counts() if spec.pgvector.enabled else {}
        points = dict.fromkeys(range(spec.shards), 0)
        if spec.qdrant.enabled:
            with runtime.qdrant.store.session(runtime.qdrant.collection):
                points = {index: runtime.qdrant.count(index) for index in range(spec.shards)}
        for index, key in enumerate(spec.shard_keys):
            shards[key] = {
                "eligible_rows": work[index].eligible_rows,
                "embedded_rows": work[index].embedded_rows,
                "pending_rows": work[index].pending_rows,
                "pgvector_chunks": chunks.get(index, 0),
                "qdrant_points": points[index],
            }
    else:
        work = runtime.work()
        held = runtime.ledger.holdings_by_shard()
        for index, key in enumerate(spec.shard_keys):
            current, chunks, points = held.get(index, (0, 0, 0))
            shards[key] = {
                "eligible_rows": current + work[index].pending_rows,
                "embedded_rows": current,
                "pending_rows": work[index].pending_rows,
                "pgvector_chunks": chunks if spec.pgvector.enabled else 0,
                "qdrant_points": points if spec.qdrant.enabled else 0,
            }
    for index, key in enumerate(spec.shard_keys):
        failed, dead = errors.get(index, (0, 0))
        shards[key].update(failed_rows=failed, dead_rows=dead)
    totals = {f: sum(s[f] for s in shards.values()) for f in STATUS_FIELDS}
    counted = runtime.diff.counted()
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
        "exact": is_exact,
        "eligible_rows_counted": counted[0],
        "counted_at": counted[1],
        "shards": shards,
    }


def id_warnings(report: dict, id_column: str) -> list[str]:
    """What status says of rows it cannot track: NULL ids and duplicated ids."""
    warnings = []
    if report["null_id_rows"]:
        warnings.append(
            f"{report['null_id_rows']} eligible rows have a NULL `{id_column}` and are never "
            "embedded; give them an id, or leave them out with `where:`"
        )
    if report["duplicate_ids"]:
        warnings.append(
            f"ids shared by several rows (not updated until only one row has each): "
            f"{report['duplicate_ids']}; see `embedding-assets errors`"
        )
    return warnings


@main.command()
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
    from embedding_assets.generations_cli import generation_line

    ensure_database()
    settings = _settings(ctx)
    reports = [status_report(settings, name, exact) for name in _sources(settings, source)]
    if as_json:
        click.echo(json.dumps(reports, default=str))
        return
    for report in reports:
        click.echo(
            f"{report['source']} -> {report['pgvector_table']} / "
            f"qdrant:{report['qdrant_collection']}  ({report['change_capture']} capture)"
        )
        click.echo(f"  {'shard':>5} " + " ".join(f"{f:>15}" for f in STATUS_FIELDS))
        for key, shard in report["shards"].items():
            click.echo(f"  {key:>5} " + " ".join(f"{shard[f]:>15}" for f in STATUS_FIELDS))
        click.echo(f"  {'total':>5} " + " ".join(f"{report[f]:>15}" for f in STATUS_FIELDS))
        for warning in id_warnings(report, settings.source(report["source"]).id_column):
            click.echo(f"  WARNING: {warning}")
        for generation in report["generations"]:
            click.echo(f"  {generation_line(generation)}")
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


# -- errors ---------------------------------------------------------------------------


def generation_runtimes(settings: Settings, source: str) -> list:
    """Runtimes of the source's live and (while one is built) building generation."""
    from embedding_assets.environment import database_url
    from embedding_assets.generations import all_runtimes
    from embedding_assets.runtime import make_embedder, qdrant_store_from_env

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    return all_runtimes(
        spec, embedder_spec, make_embedder(embedder_spec), database_url(), qdrant_store_from_env()
    )


def errors_report(settings: Settings, source: str, dead_only: bool, limit: int) -> list[dict]:
    return [
        error
        for runtime in generation_runtimes(settings, source)
        for error in _generation_errors(runtime, source, dead_only, limit)
    ]


def _generation_errors(runtime, source: str, dead_only: bool, limit: int) -> list[dict]:
    spec = runtime.spec
    return [
        {
            "source": source,
            "generation": runtime.number,
            "row_id": e.row_id,
            "shard": spec.shard_keys[e.shard] if e.shard < spec.shards else str(e.shard),
            "state": e.state,
            "kind": e.kind,
            "attempts": e.attempts,
            "max_attempts": spec.retries.max_attempts,
            "first_failed_at": e.first_failed_at.isoformat(),
            "last_failed_at": e.last_failed_at.isoformat(),
            "next_retry_at": e.next_retry_at.isoformat() if e.next_retry_at else None,
            "content_hash": e.content_hash,
            "message": e.message,
        }
        for e in runtime.errors.list(limit, dead_only)
    ]


@main.group(invoke_without_command=True)
@click.option("--source", help="Only this source (default: all).")
@click.option("--dead", "dead_only", is_flag=True, help="Only rows that are no longer retried.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def errors(
    ctx: click.Context, source: str | None, dead_only: bool, limit: int, as_json: bool
) -> None:
    """Rows the embedder failed on: why, how often, and when they are tried again. A row is
    retried after a growing wait and is dead after `retries.max_attempts` failures of the
    same content (it is tried again when it changes, or by `errors replay`)."""
    if ctx.invoked_subcommand is not None:
        return
    ensure_database()
    settings = _settings(ctx)
    found = [
        e
        for name in _sources(settings, source)
        for e in errors_report(settings, name, dead_only, limit)
    ]
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no failed rows")
        return
    for e in found:
        when = (
            f"retry at {e['next_retry_at']}"
            if e["next_retry_at"]
            else ("dead" if e["state"] == "dead" else "queued for retry")
        )
        click.echo(
            f"{e['source']}/{e['shard']}  {e['row_id']}  {e['kind']}  "
            f"{e['attempts']}/{e['max_attempts']} attempts, {when}: {e['message']}"
        )


@errors.command("replay")
@click.option("--source", help="Only this source (default: all).")
@click.option("--row", "rows", multiple=True, help="A row id (repeatable).")
@click.option("--all-dead", is_flag=True, help="Every dead row.")
@click.option("--all", "every", is_flag=True, help="Every failed row, dead or waiting.")
@click.pass_context
def errors_replay(
    ctx: click.Context, source: str | None, rows: tuple[str, ...], all_dead: bool, every: bool
) -> None:
    """Forget rows' failures and make them pending now (the next sync or sensor run tries
    them again), in the live generation and the one being built."""
    if sum([bool(rows), all_dead, every]) != 1:
        raise click.UsageError("give --row ID (repeatable), --all-dead or --all")
    ensure_database()
    settings = _settings(ctx)
    for name in _sources(settings, source):
        replayed = 0
        for runtime in generation_runtimes(settings, name):
            replayed += runtime.errors.replay(
                list(rows) if rows else None,
                dead_only=all_dead,
                enqueue=runtime.feed.mode != "diff",
            )
        click.echo(f"{name}: {replayed} rows pending again")


# -- reconcile and triggers -------------------------------------------------------------


@main.command()
@click.option("--source", help="Only this source (default: all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def reconcile(ctx: click.Context, source: str | None, as_json: bool) -> None:
    """Compare each source with the ledger (a full scan) and queue whatever the change feed
    missed; `sync` or the sensor then brings those rows up to date."""
    ensure_database()
    settings = _settings(ctx)
    results = []
    for name in _sources(settings, source):
        for runtime in generation_runtimes(settings, name):
            results.append(_reconcile_generation(runtime, name))
    if as_json:
        click.echo(json.dumps(results))
        return
    for r in results:
        note = (
            " (diff capture compares everything on every run)"
            if r["change_capture"] == ("diff")
            else ""
        )
        click.echo(f"{r['source']}: {r['rows_queued']} rows queued in {r['seconds']}s{note}")
        for key, what in r["destinations_repaired"].items():
            click.echo(f"  shard {key}: {what}")


def _reconcile_generation(runtime, source: str) -> dict:
    started = time.perf_counter()
    found, disagree = runtime.reconcile()
    return {
        "source": source,
        "generation": runtime.number,
        "change_capture": runtime.feed.mode,
        "rows_queued": found,
        "destinations_repaired": {
            runtime.spec.shard_keys[a.shard]: describe_audit(a) for a in disagree
        },
        "seconds": round(time.perf_counter() - started, 2),
    }


@main.group()
def triggers() -> None:
    """The capture triggers of `table:` sources (change_capture: trigger)."""


def _trigger_feed(ctx: click.Context, source: str):
    from embedding_assets.environment import database_url
    from embedding_assets.runtime import runtime_for
    from embedding_assets.state.feeds import TriggerFeed

    settings = _settings(ctx)
    name = _sources(settings, source)[0]
    if settings.source(name).table is None:
        raise click.ClickException(f"source {name!r} is a `query:` source: no triggers")
    runtime = runtime_for(settings, name, database_url())
    return TriggerFeed(
        runtime.engine, runtime.spec, runtime.diff, runtime.feed.queue, runtime.feed.watched_extra
    )


@triggers.command("sql")
@click.option("--source", required=True)
@click.pass_context
def triggers_sql(ctx: click.Context, source: str) -> None:
    """Print the SQL that installs the triggers, for a DBA to run."""
    ensure_database()
    feed = _trigger_feed(ctx, source)
    with feed.engine.connect() as conn:
        click.echo(feed.triggers(conn).dba_sql())


@triggers.command("install")
@click.option("--source", required=True)
@click.pass_context
def triggers_install(ctx: click.Context, source: str) -> None:
    """Install (or replace) the triggers and queue what a full diff finds pending."""
    ensure_database()
    feed = _trigger_feed(ctx, source)
    # A TriggerPrivilegeError reaches the user as its message through _Commands.
    with feed.engine.begin() as conn:
        found = feed.install(conn, feed.triggers(conn))
    click.echo(f"installed capture triggers for {source}; {found} rows queued")


@triggers.command("drop")
@click.option("--source", required=True)
@click.pass_context
def triggers_drop(ctx: click.Context, source: str) -> None:
    """Drop the triggers (set change_capture to watermark or diff, or they come back)."""
    ensure_database()
    _trigger_feed(ctx, source).drop()
    click.echo(f"dropped capture triggers of {source}")


# -- serve ----------------------------------------------------------------------------

WORKER_PORT_ENV = "EMBEDDING_ASSETS_WORKER_PORT"
DEFAULT_WORKER_PORT = 8431


def worker_port() -> int:
    return int(os.environ.get(WORKER_PORT_ENV) or DEFAULT_WORKER_PORT)


def worker_url() -> str:
    """The URL the bundled demo's `openai` embedder uses to reach `embedding-assets serve`."""
    return f"http://127.0.0.1:{worker_port()}/v1"


@main.command()
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help=f"Default: ${WORKER_PORT_ENV} or 8431.")
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bfloat16: ~2x on CPUs with avx512_bf16/AMX; served as '<model>@bf16'.",
)
def serve(model: str, host: str, port: int | None, precision: str) -> None:
    """The local model behind an OpenAI-compatible /v1/embeddings (and /health), batching
    concurrent requests into one forward pass: one warm model for every run."""
    from embedding_assets.worker import serve as run_worker

    try:
        run_worker(model=model, host=host, port=port or worker_port(), precision=precision)
    except OSError as exc:  # a busy port or a missing model folder, already explained
        raise click.ClickException(str(exc)) from exc


# -- dev ------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@click.pass_context
def dev(ctx: click.Context, host: str, port: int) -> None:
    """Postgres, the demo data, and the Dagster webserver + daemon with the sensors on.
    Ctrl-C stops everything this command started."""
    import dagster as dg

    from embedding_assets.demo import load_demo
    from embedding_assets.environment import (
        database_url,
        prepare_dagster_home,
        uses_embedded_postgres,
    )
    from embedding_assets.pools import apply_pool_limits, pool_limits
    from embedding_assets.settings import BUNDLED_SOURCES
    from embedding_assets.state.db import engine_for

    started_postgres = uses_embedded_postgres() and _embedded().start()
    url = database_url()
    settings = _settings(ctx)
    if settings.path == BUNDLED_SOURCES.resolve():
        rows = load_demo(engine_for(url))
        click.echo(f"demo source public.pypi_packages: {rows} rows")
    home = prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        apply_pool_limits(instance, pool_limits(settings, not os.environ.get("QDRANT_URL")))
    env = {**os.environ, "EMBEDDING_ASSETS_SOURCES": str(settings.path)}
    children: list[subprocess.Popen] = []
    stopping: list[str] = []

    def stop(signum: int, _frame) -> None:
        stopping.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    # Set, not inherited: a `dev` started in the background (`&`, nohup) inherits SIGINT
    # ignored, and SIGTERM (supervisors, containers) would otherwise kill it uncleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        if any(worker_url() in getattr(e, "base_urls", ()) for e in settings.embedders.values()):
            children.append(start_worker(env))
        click.echo(f"Dagster home {home}; UI on http://{host}:{port}")
        # `dg dev`, the current command (`dagster dev` warns that it is superseded), with
        # the workspace given so no dg project config is needed. Run from the Dagster home:
        # from the checkout, Dagster warns about the dagster.yaml it sees there.
        command = [
            str(Path(sys.executable).with_name("dg")), "dev",
            "-w", str(PROJECT_ROOT / "workspace.yaml"), "-h", host, "-p", str(port),
            "--log-level", "warning",
        ]  # fmt: skip
        children.append(subprocess.Popen(command, env=env, cwd=home, start_new_session=True))
        children[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up
        for child in reversed(children):  # Dagster first, then the worker its runs call
            stop_child(child)
        if started_postgres:
            _embedded().stop()
            click.echo("stopped embedded Postgres")
    if stopping:
        click.echo(f"stopped by {stopping[0]}")
        sys.exit(0)
    sys.exit(children[-1].returncode or 0 if children else 1)


def start_worker(env: dict[str, str]) -> subprocess.Popen:
    """`embedding-assets serve` on the worker port; returns once it answers /health."""
    import urllib.request

    worker = subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "serve", "--port", str(worker_port())],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise click.ClickException(f"the inference worker exited ({worker.returncode})")
        try:
            with urllib.request.urlopen(f"{worker_url()[:-3]}/health", timeout=2):
                click.echo(f"inference worker on {worker_url()}")
                return worker
        except OSError:
            time.sleep(0.5)
    stop_child(worker)
    raise click.ClickException("the inference worker did not answer /health within 120 s")


def stop_child(child: subprocess.Popen) -> None:
    """Interrupt a child started in its own session, then end whatever is left of its
    process group. Children get their own session because a terminal's Ctrl-C reaching
    Dagster's code server directly leaves it running after its parents exit."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)


def _add_generation_commands() -> None:
    from embedding_assets.generations_cli import generations, plan

    main.add_command(generations)
    main.add_command(plan)


_add_generation_commands()


def entry() -> None:
    """The console script: `main`, then out without the interpreter's teardown. Everything
    durable is committed or closed by then; tearing down torch, the embedded Qdrant engine
    and thousands of modules took 1.4-2.2 s of native code after every sync here."""
    import logging

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    entry()
