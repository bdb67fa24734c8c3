"""`embedding-assets generations ...` and `embedding-assets plan`: a source's generations,
promotion, rollback and drop by hand, and what a build will embed (and cost) before it
starts. Registered on the main CLI group by `embedding_assets.cli`."""

import json
from typing import Any

import click

from embedding_assets.cli.output import generation_line
from embedding_assets.config.settings import Settings


def generations_report(
    settings: Settings, source: str, runtimes: list | None = None
) -> list[dict[str, Any]]:
    """Every generation of the source: number, model, state, coverage, times. Coverage of
    a live or building generation: rows it stores current ÷ those plus its pending and
    failed rows (from the ledger and its change feed, no scan); a previous one is not
    updated, so its coverage is against the live generation's rows. `runtimes`: the live
    and building generations' runtimes when the caller has them already."""
    from embedding_assets.cli.common import generation_runtimes
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import Generations

    runtimes = {
        r.number: r for r in runtimes or generation_runtimes(settings, source, register=False)
    }
    engine = engine_for(database_url())
    reports = []
    live_rows = None
    for generation in Generations(engine, source).all():
        report = generation.describe()
        runtime = runtimes.get(generation.number)
        if runtime is not None:
            embedded = sum(runtime.ledger.current_rows_by_shard().values())
            pending = sum(w.pending_rows for w in runtime.work(ensure=False).values())
            failed = sum(f + d for f, d in runtime.errors.counts_by_shard().values())
            eligible = embedded + pending + failed
            if generation.state == "live":
                live_rows = eligible
            report.update(embedded_rows=embedded, pending_rows=pending, failed_rows=failed)
            report["coverage"] = round(embedded / eligible, 4) if eligible else 1.0
        reports.append(report)
    for report in reports:
        if report["state"] == "previous":
            count = _stored_rows(engine, source, report["number"])
            report["embedded_rows"] = count
            report["coverage"] = round(min(1.0, count / live_rows), 4) if live_rows else None
    return reports


def _stored_rows(engine, source: str, number: int) -> int:
    import sqlalchemy as sa

    from embedding_assets.state.ddl import STATE_SCHEMA

    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.text(
                    f"""SELECT count(*) FROM {STATE_SCHEMA}.row_state AS s
                    JOIN {STATE_SCHEMA}.generations AS g ON g.target = s.target
                    WHERE g.source = :s AND g.number = :n AND NOT s.deleted"""
                ),
                {"s": source, "n": number},
            )
        )


@click.group()
def generations() -> None:
    """A source's generations: one per model / template / chunking. A change in
    sources.yaml builds a new one beside the live one; readers switch when it is complete
    and its checks pass."""


@generations.command("list")
@click.option("--source", help="Only this source (default: all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def list_generations(ctx: click.Context, source: str | None, as_json: bool) -> None:
    """Each generation: number, model, state, coverage, created and promoted times."""
    from embedding_assets.cli.common import ensure_database, settings_from, source_names

    ensure_database()
    settings = settings_from(ctx)
    found = {name: generations_report(settings, name) for name in source_names(settings, source)}
    if as_json:
        click.echo(json.dumps(found))
        return
    for name, reports in found.items():
        click.echo(name)
        for report in reports:
            click.echo(f"  {generation_line(report)}")


def _runtime(ctx: click.Context, source: str, which: int | str):
    from embedding_assets.cli.common import ensure_database, settings_from
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.generations import GenerationError
    from embedding_assets.sync.generations import runtime_for

    ensure_database()
    settings = settings_from(ctx)
    try:
        return settings, runtime_for(settings, source, database_url(), which)
    except GenerationError as exc:
        raise click.ClickException(f"source {source!r}: {exc}") from exc


@generations.command("promote")
@click.option("--source", required=True)
@click.option("--generation", "number", type=int, help="Default: the one being built.")
@click.pass_context
def promote_generation(ctx: click.Context, source: str, number: int | None) -> None:
    """Make the building generation live now, if it is complete and its checks pass."""
    from embedding_assets.sync.promotion import promote

    _, runtime = _runtime(ctx, source, number if number is not None else "building")
    blockers = promote(runtime)
    if blockers:
        raise click.ClickException(
            f"generation {runtime.number} of {source!r} is not promoted: " + "; ".join(blockers)
        )
    click.echo(f"{source}: generation {runtime.number} ({runtime.model_id}) is live")


@generations.command("rollback")
@click.option("--source", required=True)
@click.option("--generation", "number", type=int, help="Default: the latest previous one.")
@click.pass_context
def rollback_generation(ctx: click.Context, source: str, number: int | None) -> None:
    """Make a previous generation live again: it catches up with the changes it missed
    (the next sync or the sensor), then is promoted."""
    from embedding_assets.state.generations import GenerationError
    from embedding_assets.sync.promotion import rollback

    settings, live = _runtime(ctx, source, "live")
    if number is None:
        previous = [g for g in _registry(live).all() if g.state == "previous"]
        if not previous:
            raise click.ClickException(f"source {source!r} has no previous generation")
        number = previous[-1].number
    _, runtime = _runtime(ctx, source, number)
    try:
        queued = rollback(runtime, settings.source(source))
    except GenerationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(
        f"{source}: generation {number} is catching up ({queued} rows queued); it goes live "
        "once current (`embedding-assets sync`, or the sensor)"
    )


def _registry(runtime):
    from embedding_assets.state.generations import Generations

    return Generations(runtime.engine, runtime.spec.name)


@generations.command("drop")
@click.option("--source", required=True)
@click.option("--generation", "number", type=int, required=True)
@click.pass_context
def drop_generation(ctx: click.Context, source: str, number: int) -> None:
    """Remove a generation that is not live: its pgvector table, Qdrant collection and
    state. Previous generations are dropped by themselves after `keep_previous_hours`."""
    from embedding_assets.state.generations import GenerationError
    from embedding_assets.sync.generations import config_key
    from embedding_assets.sync.promotion import drop

    settings, runtime = _runtime(ctx, source, number)
    spec = settings.source(source)
    try:
        configured = _runtime(ctx, source, None)[1].embedder.model_id
        drop(runtime, config_key(spec, settings.embedder_for(spec), configured))
    except GenerationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{source}: generation {number} dropped")


# -- plan -------------------------------------------------------------------------------
