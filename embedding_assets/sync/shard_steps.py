"""One shard's sync as plain steps, each returning its value and the figures its Dagster event
carries: read the pending rows, chunk them, embed them, store them (every transactional
destination, in the ledger's transaction), plan and apply the index update (Qdrant).

The per-shard assets and IO managers call these for a run of one shard; `sync_shards` calls
them for many shards in one run. Both report the same figures, so the UI, `status` and the
checks read the same thing whichever ran. No Dagster here: `log` is anything with `info` and
`warning` taking a line (a Dagster context's log, a `logging.Logger`), and metadata values
are plain (the Dagster wrappers type them).
"""

import time
from dataclasses import replace
from typing import Any, Protocol

from embedding_assets.core.delta import ChunkedRows, EmbeddedRows, IndexUpdate, PendingRows
from embedding_assets.sync.chunk import chunk_rows, effective_max_tokens
from embedding_assets.sync.config_edits import apply_config
from embedding_assets.sync.embed import embed_chunks, fit_token_budget, reusable_vectors
from embedding_assets.sync.promotion import after_index_write
from embedding_assets.sync.runtime import SourceRuntime
from embedding_assets.sync.store import store_embeddings

Metadata = dict[str, Any]


class Log(Protocol):
    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...


# What the `embeddings` step reports of the chunk table when the source has none
# (`pgvector: false`); the chunk table's own figures replace these.
WITHOUT_CHUNK_TABLE = {
    "pgvector_table": "off",
    "vector_index_dropped_for_rewrite": False,
    "vector_index_built": False,
    "index_build_duration_seconds": 0.0,
}


def generation_figures(runtime: SourceRuntime) -> Metadata:
    """Which generation a step worked on (the Dagster wrapper shows the number as text)."""
    generation = runtime.generation
    if generation is None:
        return {}
    return {"generation": str(generation.number), "generation_state": generation.state}


def per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def check_before_reading(runtime: SourceRuntime, log: Log) -> None:
    """What a run checks before it reads any row: privileges (a missing grant stops it
    before any embedding) and edits of sources.yaml (brought in by whoever runs first)."""
    runtime.require_privileges()
    edit = apply_config(runtime)
    if edit.changed:
        log.info(f"{runtime.spec.name}: {edit.describe()}")


def read_pending(
    runtime: SourceRuntime,
    shard: int,
    log: Log,
    shard_key: str,
    check_config: bool = True,
    live_rows: int | None = None,
) -> tuple[PendingRows, Metadata]:
    """The shard's rows that need work now (at most `max_rows_per_run`), after the shard's
    claim and (unless the caller made them once for many shards: `check_config=False`) the
    checks before reading. The live lane passes `live_rows`: its newest changes, that many
    at most (the rest is the runs' bulk work)."""
    started = time.perf_counter()
    if check_config:
        check_before_reading(runtime, log)
    runtime.claim_shard(
        shard,
        on_wait=lambda: log.info(
            f"shard {shard_key} is being synced by another run; waiting for its write, so no "
            "row is embedded twice"
        ),
    )
    spec = runtime.spec
    if live_rows is None:
        found = runtime.feed.pending(shard, spec.max_rows_per_run)
    else:
        found = runtime.feed.pending(shard, live_rows, newest_first=True)
    pending = replace(found, generation=runtime.number)
    return pending, {
        "rows": len(pending.rows),
        "rows_to_delete": len(pending.deleted),
        "empty_text_rows": pending.empty_rows,
        "backlog": pending.backlog,
        "change_capture": runtime.feed.mode,
        **generation_figures(runtime),
        "feed_entries": len(pending.consumed),
        "duration_seconds": round(time.perf_counter() - started, 3),
    }


def chunk_pending(runtime: SourceRuntime, pending: PendingRows) -> tuple[ChunkedRows, Metadata]:
    started = time.perf_counter()
    embedder = runtime.embedder
    chunked = chunk_rows(pending, runtime.spec, embedder)
    seconds = time.perf_counter() - started
    return chunked, {
        "rows": len(pending.rows),
        "chunks": len(chunked.chunks),
        "tokens": chunked.tokens,
        "max_tokens": effective_max_tokens(runtime.spec, embedder),
        "empty_text_rows": pending.empty_rows,
        "duration_seconds": round(seconds, 3),
        "rows_per_second": per_second(len(pending.rows), seconds),
    }


def embedder_stats(embedder) -> dict[str, float]:
    """Cumulative request counters of a remote embedder ({} for a local model)."""
    stats = getattr(embedder, "stats", None)
    return dict(stats()) if stats else {}


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This run's share: requests, retries, throttled seconds, tokens, provider usage."""
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    # Counters stay integers (the UI plots 3.0 requests otherwise); waits keep decimals.
    return {
        f"embedder_{k}": int(v) if float(v).is_integer() else round(v, 3) for k, v in delta.items()
    }


def embed_pending(
    runtime: SourceRuntime, chunks: ChunkedRows, log: Log, from_qdrant: bool = True
) -> tuple[EmbeddedRows, Metadata]:
    """One vector per chunk, reusing stored ones, within the daily token budget; progress
    kept as it goes. `failed_row_reasons` is a dict (the wrapper shows it as JSON). Off the
    thread that holds an embedded Qdrant store, `from_qdrant=False` (see QdrantNeeded)."""
    started = time.perf_counter()
    embedder = runtime.embedder
    reusable = reusable_vectors(runtime, chunks, from_qdrant)
    calls_before = embedder_stats(embedder)
    tokens_left = runtime.budget.left()
    deferred: list[str] = []
    if tokens_left is not None:
        chunks, deferred = fit_token_budget(chunks, reusable, embedder.dimension, tokens_left)
        if deferred:
            log.warning(
                f"{len(deferred)} rows wait for tomorrow's token budget of embedder "
                f"{runtime.budget.embedder!r} ({runtime.budget.per_day:,} tokens per UTC "
                f"day, {tokens_left:,} left): they stay pending, nothing fails"
            )

    def keep_progress(hashes: list[str], vectors, done: int, total: int) -> None:
        # Committed at once: a run interrupted after this keeps these vectors.
        runtime.vector_cache.save(hashes, vectors)
        log.info(f"embedded {done:,} of {total:,} new chunks (progress kept)")

    embedded = embed_chunks(chunks, embedder, reusable, keep_progress)
    runtime.budget.spend(embedded.embedded_tokens)
    seconds = time.perf_counter() - started
    rows = len(chunks.pending.rows)
    reasons = {
        row: f"{failure.kind}: {failure.message}" for row, failure in embedded.failures.items()
    }
    if reasons:
        log.warning(
            f"{len(reasons)} rows failed and are recorded in the error table (retried "
            f"later; `embedding-assets errors --source {runtime.spec.name}` lists them): "
            + "; ".join(f"{row}: {why}" for row, why in list(reasons.items())[:5])
        )
    return embedded, {
        **stats_delta(calls_before, embedder_stats(embedder)),
        "failed_rows": len(embedded.failures),
        "failed_row_reasons": dict(list(reasons.items())[:50]),
        **generation_figures(runtime),
        "rows": rows,
        "chunks": len(chunks.chunks),
        "tokens": chunks.tokens,
        "embedded_chunks": embedded.embedded_chunks,
        "embedded_tokens": embedded.embedded_tokens,
        "reused_chunks": embedded.reused_chunks,
        "rows_waiting_for_token_budget": len(deferred),
        "duration_seconds": round(seconds, 3),
        "rows_per_second": per_second(rows, seconds),
    }


def store(runtime: SourceRuntime, embedded: EmbeddedRows, log: Log) -> Metadata:
    """Every transactional destination written in the ledger's transaction; without a
    following destination (no Qdrant), promotion and the readers' switch happen here."""
    started = time.perf_counter()
    stats = store_embeddings(runtime, embedded)
    seconds = time.perf_counter() - started
    shard = embedded.pending.shard
    waiting, dead = runtime.errors.counts_by_shard().get(shard, (0, 0))
    _, chunks, _ = runtime.ledger.holdings_by_shard(shard).get(shard, (0, 0, 0))
    figures = {
        "dagster/row_count": chunks,  # the shard's chunks in the table now
        "rows_waiting_for_retry": waiting,
        "dead_rows": dead,
        **WITHOUT_CHUNK_TABLE,
        **stats.metadata,  # each destination's figures
        "rows_written": stats.rows_written,
        "chunks_written": stats.chunks_written,
        "rows_deleted": stats.rows_deleted,
        "rows_skipped_newer_write": stats.rows_skipped_stale,
        "rows_refused_by_destinations": stats.rows_refused,
        "write_duration_seconds": round(seconds, 3),
    }
    if not runtime.following:
        figures.update(after_index_write(runtime, log))
    return figures


def plan_index(runtime: SourceRuntime, shard: int) -> tuple[IndexUpdate, Metadata]:
    """What Qdrant must change for the shard to equal pgvector and the ledger (reads only)."""
    started = time.perf_counter()
    update, stats = runtime.qdrant.plan(
        shard, runtime.embedder.dimension, runtime.spec.max_rows_per_run, runtime.model_id
    )
    update.generation = runtime.number
    return update, {
        "rows": stats.lag_rows,
        "reconciled_shard": stats.reconciled,
        "created_collection": stats.created_collection,
        "backlog": update.backlog,
        **generation_figures(runtime),
        "planning_duration_seconds": round(time.perf_counter() - started, 3),
    }


def apply_index(runtime: SourceRuntime, update: IndexUpdate, log: Log, server: bool) -> Metadata:
    """Apply the update, record it in the ledger, then promote a finished build, keep readers
    on the live generation and drop expired ones (this step holds the embedded store)."""
    started = time.perf_counter()
    runtime.qdrant.apply(update)
    seconds = time.perf_counter() - started
    outcome = after_index_write(runtime, log)
    _, _, points = runtime.ledger.holdings_by_shard(update.shard).get(update.shard, (0, 0, 0))
    return {
        "dagster/row_count": points,  # the shard's points in the collection now
        "qdrant_collection": runtime.qdrant.collection,
        "qdrant": "server" if server else "embedded",
        "points_upserted": len(update.upserts),
        "points_deleted": len(update.deletes),
        "rows_synced": len(update.synced),
        **outcome,
        "write_duration_seconds": round(seconds, 3),
    }
