"""`embedding-assets plan`: what a sync of the configured pipeline will embed and cost before it
starts; reads only."""

import json
from typing import Any

import click

from embedding_assets.config.settings import Settings


def plan_report(settings: Settings, source: str) -> dict[str, Any]:
    """What syncing the configured pipeline still costs: rows, chunks and tokens (the
    embedder's own tokenizer), chunks reused instead of embedded, and the price."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.sync.chunk import chunk_rows
    from embedding_assets.sync.config_edits import pending_edits
    from embedding_assets.sync.embed import new_chunks, new_tokens, reusable_vectors

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
    edits = pending_edits(runtime) if runtime.generation is not None else None
    return {
        "source": source,
        "generation": label,
        # Keys edited since the store was brought in line, with their effect (config.effects);
        # the counts below are what applying them costs: rows leaving, entering, rewritten.
        "config_changes": {k: str(v) for k, v in (edits or {}).items()},
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
        # The live generation on the quality gate's queries (None: no gate configured).
        "live_quality": _live_quality(settings, source),
    }


def _live_quality(settings: Settings, source: str) -> dict[str, Any] | None:
    """What a build must match: the live generation's figure on the gate's queries."""
    from pathlib import Path

    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.generations import GenerationError
    from embedding_assets.sync.evaluation import gate_score, read_queries
    from embedding_assets.sync.generations import runtime_for

    gate = settings.source(source).generations.evaluate
    if gate is None:
        return None
    try:
        live = runtime_for(settings, source, database_url(), "live", register=False)
        queries = read_queries(Path(gate.queries))
        value, how = gate_score(live, queries, gate.metric)
    except (ValueError, GenerationError) as problem:
        return {"metric": gate.metric, "error": str(problem)}
    return {
        "metric": gate.metric,
        "value": round(value, 4),
        "measured_in": how,
        "queries": len(queries),
        "max_drop": gate.max_drop,
    }


def planned_runtime(settings: Settings, source: str, database_url: str):
    """The runtime of the generation the configured pipeline has, or would get (built,
    not registered: `plan` changes nothing), and how to call it."""
    from embedding_assets.embedders.build import make_embedder
    from embedding_assets.ops.environment import qdrant_store_from_env
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import Generations
    from embedding_assets.sync.generations import (
        config_key,
        configured_generation,
        new_generation,
        pipeline_record,
        runtime_of_generation,
    )

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    embedder = make_embedder(embedder_spec)
    store = qdrant_store_from_env()
    key = config_key(spec, embedder_spec, embedder.model_id)
    existing = Generations(engine_for(database_url), spec.name).all()
    match = configured_generation(existing, spec, embedder_spec, embedder.model_id, store)
    if match is not None:
        generation = match
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
    from embedding_assets.cli.common import ensure_database, settings_from, source_names

    ensure_database()
    settings = settings_from(ctx)
    reports = [plan_report(settings, name) for name in source_names(settings, source)]
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
        if r["config_changes"]:
            edited = ", ".join(f"{k} ({v})" for k, v in r["config_changes"].items())
            click.echo(
                f"  edited since the last sync: {edited}; applying it removes "
                f"{r['rows_to_delete']:,} rows and writes {r['rows']:,} (of which the chunks "
                "above are embedded, the rest reused)"
            )
        quality = r["live_quality"]
        if quality and "error" in quality:
            click.echo(f"  quality gate: not measured: {quality['error']}")
        elif quality:
            click.echo(
                f"  quality gate: the live generation's {quality['metric']} is "
                f"{quality['value']:.4f} ({quality['measured_in']}, {quality['queries']} "
                f"queries); a build more than {quality['max_drop']} below it is not promoted"
            )
        if r["max_tokens_per_day"]:
            days = r["tokens_to_embed"] / r["max_tokens_per_day"]
            click.echo(f"  at {r['max_tokens_per_day']:,} tokens per day: {days:.1f} days")
