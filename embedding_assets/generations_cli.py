"""`embedding-assets generations ...` and `embedding-assets plan`: a source's generations,
promotion, rollback and drop by hand, and what a build will embed (and cost) before it
starts. Registered on the main CLI group by `embedding_assets.cli`."""

import json
from typing import Any

import click

from embedding_assets.settings import Settings


def generations_report(
    settings: Settings, source: str, runtimes: list | None = None
) -> list[dict[str, Any]]:
    """Every generation of the source: number, model, state, coverage, times. Coverage of
    a live or building generation: rows it stores current ÷ those plus its pending and
    failed rows (from the ledger and its change feed, no scan); a previous one is not
    updated, so its coverage is against the live generation's rows. `runtimes`: the live
    and building generations' runtimes when the caller has them already."""
    from embedding_assets.cli import generation_runtimes
    from embedding_assets.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import Generations

    runtimes = {r.number: r for r in runtimes or generation_runtimes(settings, source)}
    engine = engine_for(database_url())
    reports = []
    live_rows = None
    for generation in Generations(engine, source).all():
        report = generation.describe()
        runtime = runtimes.get(generation.number)
        if runtime is not None:
            embedded = sum(runtime.ledger.current_rows_by_shard().values())
            pending = sum(w.pending_rows for w in runtime.work().values())
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


def generation_line(report: dict[str, Any]) -> str:
    coverage = report.get("coverage")
    shown = f"{coverage:.1%}" if isinstance(coverage, float) else "-"
    line = (
        f"generation {report['number']} [{report['state']}] {report['model']}  coverage "
        f"{shown}  created {report['created_at']}"
    )
    if report.get("promoted_at"):
        line += f"  promoted {report['promoted_at']}"
    if report.get("blocked_reason") and report["state"] == "building":
        line += f"\n      not promoted: {report['blocked_reason']}"
    elif report["state"] == "building" and report["promote"] == "manual":
        line += "  (promote: manual)"
    return line


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
    from embedding_assets.cli import _settings, _sources, ensure_database

    ensure_database()
    settings = _settings(ctx)
    found = {name: generations_report(settings, name) for name in _sources(settings, source)}
    if as_json:
        click.echo(json.dumps(found))
        return
    for name, reports in found.items():
        click.echo(name)
        for report in reports:
            click.echo(f"  {generation_line(report)}")


def _runtime(ctx: click.Context, source: str, which: int | str):
    from embedding_assets.cli import _settings, ensure_database
    from embedding_assets.environment import database_url
    from embedding_assets.runtime import runtime_for
    from embedding_assets.state.generations import GenerationError

    ensure_database()
    settings = _settings(ctx)
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
    from embedding_assets.promotion import promote

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
    from embedding_assets.promotion import rollback
    from embedding_assets.state.generations import GenerationError

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
    from embedding_assets.generations import config_key
    from embedding_assets.promotion import drop
    from embedding_assets.state.generations import GenerationError

    settings, runtime = _runtime(ctx, source, number)
    spec = settings.source(source)
    try:
        configured = _runtime(ctx, source, None)[1].embedder.model_id
        drop(runtime, config_key(spec, settings.embedder_for(spec), configured))
    except GenerationError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{source}: generation {number} dropped")


# -- plan -------------------------------------------------------------------------------


def plan_report(settings: Settings, source: str) -> dict[str, Any]:
    """What syncing the configured pipeline still costs: rows, chunks and tokens (the
    embedder's own tokenizer), chunks reused instead of embedded, and the price."""
    from embedding_assets.environment import database_url
    from embedding_assets.pipeline import chunk_rows, new_chunks, new_tokens, reusable_vectors

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    runtime, label = planned_runtime(settings, source, database_url())
    embedder = runtime.embedder
    rows = chunks = tokens = to_embed = tokens_to_embed = 0
    deleted = 0
    seen: set[str] = set()  # a text new in two shards is embedded once
    for shard in range(spec.shards):
        pending = runtime.diff.pending(shard, 2**62)
        chunked = chunk_rows(pending, runtime.spec, embedder)
        reusable = reusable_vectors(runtime, chunked)
        missing = {
            h: p
            for h, p in new_chunks(chunked.chunks, reusable, embedder.dimension).items()
            if h not in seen
        }
        seen.update(missing)
        rows += len(pending.rows)
        deleted += len(pending.deleted)
        chunks += len(chunked.chunks)
        tokens += chunked.tokens
        to_embed += sum(len(positions) for positions in missing.values())  # as a run counts
        tokens_to_embed += new_tokens(chunked.chunks, missing)
    price = embedder_spec.price_per_million_tokens
    return {
        "source": source,
        "generation": label,
        "model": embedder.model_id,
        "rows": rows,
        "rows_to_delete": deleted,
        "chunks": chunks,
        "tokens": tokens,
        "chunks_to_embed": to_embed,
        "chunks_reused": chunks - to_embed,
        "tokens_to_embed": tokens_to_embed,
        "price_per_million_tokens": price,
        "estimated_cost": tokens_to_embed / 1e6 * price if price is not None else None,
        "max_tokens_per_day": embedder_spec.max_tokens_per_day,
    }


def planned_runtime(settings: Settings, source: str, database_url: str):
    """The runtime of the generation the configured pipeline has, or would get (built,
    not registered: `plan` changes nothing), and how to call it."""
    from embedding_assets.generations import (
        config_key,
        new_generation,
        pipeline_record,
        runtime_of_generation,
    )
    from embedding_assets.runtime import make_embedder, qdrant_store_from_env
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import KEPT_STATES, Generations

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    embedder = make_embedder(embedder_spec)
    store = qdrant_store_from_env()
    key = config_key(spec, embedder_spec, embedder.model_id)
    existing = Generations(engine_for(database_url), spec.name).all()
    match = [g for g in existing if g.pipeline_key == key and g.state in KEPT_STATES]
    if match:
        generation = match[0]
        label = f"{generation.number} ({generation.state})"
    else:
        number = max((g.number for g in existing), default=0) + 1
        record = pipeline_record(spec, embedder_spec, embedder.model_id)
        live = any(g.state == "live" for g in existing)
        generation = new_generation(spec, number, key, record, embedder.model_id, store, live)
        label = f"{number} (not created yet)"
    runtime = runtime_of_generation(
        spec, embedder_spec, embedder, database_url, store, existing + [generation], generation
    )
    return runtime, label


@click.command()
@click.option("--source", help="Only this source (default: all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plan(ctx: click.Context, source: str | None, as_json: bool) -> None:
    """What a sync of the configured pipeline will embed before it starts: rows, chunks,
    tokens (exact, the embedder's tokenizer), chunks reused, and the estimated cost from
    `price_per_million_tokens`. Reads only: nothing is created or embedded."""
    from embedding_assets.cli import _settings, _sources, ensure_database

    ensure_database()
    settings = _settings(ctx)
    reports = [plan_report(settings, name) for name in _sources(settings, source)]
    if as_json:
        click.echo(json.dumps(reports))
        return
    for r in reports:
        cost = (
            f"${r['estimated_cost']:,.4f} at ${r['price_per_million_tokens']}/M tokens"
            if r["estimated_cost"] is not None
            else "no price_per_million_tokens set"
        )
        click.echo(
            f"{r['source']} generation {r['generation']} ({r['model']}): {r['rows']:,} rows, "
            f"{r['chunks']:,} chunks; {r['chunks_to_embed']:,} chunks / "
            f"{r['tokens_to_embed']:,} tokens to embed, {r['chunks_reused']:,} reused; {cost}"
        )
        if r["max_tokens_per_day"]:
            days = r["tokens_to_embed"] / r["max_tokens_per_day"]
            click.echo(f"  at {r['max_tokens_per_day']:,} tokens per day: {days:.1f} days")
