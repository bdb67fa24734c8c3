"""`embedding-assets evaluate`: retrieval quality of a source's generation on labelled queries,
per backend and mode: recall@k, MRR@k and nDCG@k (`sync.evaluation`); and known-item queries
made from the source's rows (`sync.known_items`)."""

import json
from pathlib import Path

import click

from embedding_assets.cli.common import ensure_database, settings_from, source_names
from embedding_assets.config.settings import Settings
from embedding_assets.sync.evaluation import (
    MODES,
    Queries,
    backend_modes,
    evaluate_runtime,
    read_queries,
)


def evaluate_source(
    settings: Settings,
    source: str,
    queries: Queries,
    k: int,
    generation: int | str = "live",
    modes: tuple[str, ...] = MODES,
) -> dict:
    """Every (backend, mode) the generation has, each query searched once in each."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.sync.generations import runtime_for

    runtime = runtime_for(settings, source, database_url(), generation, register=False)
    pairs = [(b, m) for b, m in backend_modes(runtime) if m in modes]
    results = evaluate_runtime(runtime, queries, k, pairs)
    return {"queries": len(queries), "k": k, "generation": runtime.number, "results": results}


def write_known_items(
    settings: Settings, source: str, rows: int, out: Path | None, generation: int | str
) -> None:
    from embedding_assets.ops.environment import database_url
    from embedding_assets.sync.generations import runtime_for
    from embedding_assets.sync.known_items import known_item_queries

    if out is None:
        raise click.ClickException("--make-queries needs --out FILE (where the queries go)")
    ensure_database()
    runtime = runtime_for(settings, source, database_url(), generation, register=False)
    if not runtime.pgvector.table_exists():
        raise click.ClickException(
            f"source {source!r} has no chunk table to draw queries from: run a sync first"
        )
    queries = known_item_queries(runtime, rows)
    out.write_text("".join(json.dumps(q) + "\n" for q in queries))
    kinds = {k: sum(q["kind"] == k for q in queries) for k in ("name", "words")}
    click.echo(
        f"wrote {len(queries)} known-item queries ({kinds['name']} by name, {kinds['words']} "
        f"by distinctive words) for {source} to {out}: a smoke test of retrieval, not a "
        "benchmark (the queries come from the embedded text itself)"
    )


@click.command()
@click.option("--source", help="The source (default: the first one).")
@click.option(
    "--queries",
    "queries_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help='JSON lines: {"query": "...", "relevant": ["<row id>", ...]}.',
)
@click.option(
    "--make-queries",
    "make_queries",
    type=click.IntRange(1, 100_000),
    help="Instead: write known-item queries for N rows of the source (a smoke test, not a "
    "benchmark) to --out.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--generation", default="live", help="A number, live or building.")
@click.option("--mode", "modes", type=click.Choice(MODES), multiple=True, help="Default: all.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def evaluate(
    ctx: click.Context,
    source: str | None,
    queries_file: Path | None,
    make_queries: int | None,
    out: Path | None,
    generation: str,
    modes: tuple[str, ...],
    k: int,
    as_json: bool,
) -> None:
    """Recall@k, MRR@k and nDCG@k of a generation on labelled queries, per backend and
    search mode."""
    settings = settings_from(ctx)
    name = source_names(settings, source)[0]
    which: int | str = int(generation) if generation.isdigit() else generation
    if which not in ("live", "building") and not isinstance(which, int):
        raise click.ClickException(f"--generation {generation!r}: give a number, live or building")
    if make_queries is not None:
        write_known_items(settings, name, make_queries, out, which)
        return
    if queries_file is None:
        raise click.ClickException("give --queries FILE (or --make-queries N --out FILE)")
    try:
        queries = read_queries(queries_file)
    except ValueError as problem:
        raise click.ClickException(str(problem)) from None
    ensure_database()
    report = evaluate_source(settings, name, queries, k, which, modes or MODES)
    if as_json:
        click.echo(json.dumps(report))
        return
    click.echo(f"{name} generation {report['generation']}: {report['queries']} queries, k={k}")
    click.echo(f"  {'backend':<9} {'mode':<8} {'recall@k':>9} {'MRR@k':>7} {'nDCG@k':>7}")
    for r in report["results"]:
        click.echo(
            f"  {r['backend']:<9} {r['mode']:<8} {r['recall_at_k']:>9.4f} "
            f"{r['mrr_at_k']:>7.4f} {r['ndcg_at_k']:>7.4f}"
        )
