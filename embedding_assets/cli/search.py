"""`embedding-assets search`: the nearest chunks (or, with the column backend, rows) to a text, in
the live generation."""

import json

import click

from embedding_assets.cli.common import ensure_database, settings_from, source_names
from embedding_assets.config.settings import Settings
from embedding_assets.sync.evaluation import MODES


def default_mode(runtime, backend: str) -> str:
    """hybrid where the backend holds the source's lexical side, else dense."""
    if not runtime.spec.hybrid.enabled:
        return "dense"
    if backend == "pgvector" and runtime.pgvector.has_lexical():
        return "hybrid"
    if backend == "qdrant" and runtime.qdrant.has_lexical():
        return "hybrid"
    return "dense"


def search_source(
    settings: Settings,
    source: str,
    text: str,
    limit: int,
    backend: str,
    exact: bool = False,
    mode: str | None = None,
    generation: int | str = "live",
) -> list[dict]:
    """Nearest chunks to `text` in the live generation (with its model, whatever
    sources.yaml says now): point id, row id, chunk index, score (cosine similarity;
    full-text rank for lexical, the fused RRF score for hybrid), chunk text and metadata (the
    readers' `metadata`: row_id, chunk_index and the source's metadata columns). With the
    `column` backend, nearest rows by their write-back vector, with the row's text. `mode`:
    None, the backend's default."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import Generations
    from embedding_assets.sync.generations import runtime_for

    if not any(g.state == "live" for g in Generations(engine_for(database_url()), source).all()):
        raise click.ClickException(
            f"source {source!r} has no embeddings yet: run `embedding-assets sync` first"
        )
    # Read only: the live generation as it is, whatever pipeline sources.yaml asks for now.
    runtime = runtime_for(settings, source, database_url(), generation, register=False)
    mode = mode or default_mode(runtime, backend)
    if mode != "dense" and backend == "column":
        raise click.ClickException(
            f"{mode} search needs full text, which the write-back column (one vector per "
            "row) has not: search --backend pgvector or qdrant, or --mode dense"
        )
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
    vector = runtime.embedder.embed_query(text) if mode != "lexical" else None
    try:
        return _hits(runtime, backend, vector, limit, exact, mode, text)
    except LookupError as missing:
        raise click.ClickException(str(missing)) from None


def _hits(runtime, backend: str, vector, limit: int, exact: bool, mode: str, text: str) -> list:
    """The pgvector or Qdrant hits as `search --json` prints them."""
    from embedding_assets.destinations.qdrant import payload_metadata

    if backend == "pgvector":
        hits = runtime.pgvector.search(vector, limit, exact=exact, mode=mode, text=text)
        metadata = runtime.pgvector.metadata_of([h.point_id for h in hits])
        return [
            {
                "id": h.point_id,
                "row_id": h.row_id,
                "chunk_index": h.chunk_index,
                "score": h.score,
                "text": h.text,
                "metadata": metadata.get(h.point_id, {}),
            }
            for h in hits
        ]
    found = runtime.qdrant.search(vector, limit, exact=exact, mode=mode, text=text)
    return [
        {
            "id": h.id,
            "row_id": h.payload.get("row_id"),
            "chunk_index": h.payload.get("chunk_index"),
            "score": h.score,
            "text": h.payload.get("text"),
            "metadata": payload_metadata(h.payload),
        }
        for h in found
    ]


@click.command()
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
    "--mode",
    type=click.Choice(MODES),
    default=None,
    help="dense: the vectors; lexical: full text (pgvector) or BM25 terms (Qdrant); hybrid: "
    "both, fused by reciprocal rank (the default where the backend has the lexical side).",
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
    mode: str | None,
    exact: bool,
    as_json: bool,
) -> None:
    """Nearest chunks to TEXT, with row id and score."""
    ensure_database()
    settings = settings_from(ctx)
    name = source_names(settings, source)[0]
    hits = search_source(settings, name, text, limit, backend, exact, mode)
    if as_json:
        click.echo(json.dumps(hits))
        return
    for hit in hits:
        click.echo(f"{hit['score']:.4f}  {hit['row_id']}  {hit['text']}")
