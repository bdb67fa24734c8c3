"""The store stage: a shard's embedded rows written to every destination that is written in the
ledger's transaction, with the ledger, the error table and the change feed's acknowledgement,
all or nothing."""

import time
from dataclasses import dataclass

from embedding_assets.core.delta import (
    EmbeddedRows,
)
from embedding_assets.state.ddl import shard_lock
from embedding_assets.sync.runtime import SourceRuntime


@dataclass(frozen=True)
class WriteStats:
    rows_written: int
    chunks_written: int
    rows_deleted: int
    rows_skipped_stale: int
    index_dropped: bool = False
    index_built: bool = False
    index_seconds: float = 0.0
    # The write-back column: rows given their vector, rows left as they were because they
    # changed after they were read (their change is queued), and its index built.
    column_rows_written: int = 0
    column_rows_changed_since_read: int = 0
    column_index_built: bool = False


def store_embeddings(runtime: SourceRuntime, batch: EmbeddedRows) -> WriteStats:
    """Replace the chunks of every processed row and remove deleted rows, in one transaction
    with the ledger and the change feed's acknowledgement. A row stored after this batch's
    delta was read (by a newer run) is skipped: the newer write wins and nothing regresses.
    Rows the embedder failed on are recorded in the error table, in the same transaction;
    their feed entries are consumed with the rest (the error table retries them)."""
    if batch.model_id and batch.model_id != runtime.model_id:
        raise RuntimeError(
            f"embeddings of source {runtime.spec.name!r} were computed by {batch.model_id} "
            f"but the source now uses {runtime.model_id}; re-run the shard"
        )
    pending = batch.pending
    upsert_ids = pending.rows["row_id"].tolist()
    all_ids = upsert_ids + pending.deleted
    dimension = batch.vectors.shape[1] if batch.vectors.ndim == 2 else runtime.embedder.dimension
    if all_ids:
        runtime.ensure_target(dimension)
    if runtime.column is not None and all_ids:
        # Columns are added in a short transaction of their own: ALTER TABLE's lock on the
        # application's table must not last the whole write. The write checks again.
        with runtime.engine.begin() as conn:
            runtime.column.ensure(conn, dimension, runtime.is_live, runtime.feed.mode != "diff")
    with runtime.engine.begin() as conn:
        shard_lock(conn, runtime.target, pending.shard)
        live = runtime.require_kept(conn) == "live"
        if runtime.column is not None and all_ids:
            runtime.column.ensure(conn, dimension, live, enqueue=runtime.feed.mode != "diff")
        stale = runtime.ledger.newer_rows(conn, all_ids, pending.computed_at) if all_ids else set()
        chunk_table = runtime.spec.pgvector.enabled
        chunks = batch.chunked.chunks
        dropped = chunk_table and runtime.pgvector.drop_index_for_rewrite(conn, len(chunks))
        if dropped:
            runtime.ledger.set_vector_index(conn, "deferred")
        if chunk_table:
            chunks_written, refused = runtime.pgvector.replace_rows(
                conn, batch, stale, runtime.model_id
            )
        else:
            chunks_written, refused = int((~chunks["row_id"].isin(stale)).sum()), {}
        counts = chunks.groupby("row_id").size().to_dict() if len(chunks) else {}
        hashes = dict(zip(pending.rows["row_id"], pending.rows["content_hash"], strict=True))
        written = [r for r in upsert_ids if r not in stale and r not in refused]
        runtime.ledger.record_written(
            conn,
            pending.shard,
            written,
            [hashes[r] for r in written],
            [int(counts.get(r, 0)) for r in written],
        )
        removed = [r for r in pending.deleted if r not in stale]
        runtime.ledger.record_deleted(conn, removed)
        column_written = column_changed = 0
        if runtime.column is not None and (written or removed):
            column_written, column_changed = runtime.column.write(
                conn, batch, written, removed, hashes, runtime.model_id, live
            )
        runtime.errors.clear(conn, written + removed)
        if chunk_table:
            runtime.vector_cache.forget(conn, chunks["chunk_hash"].tolist())
        else:  # the cache is the chunk vectors' store: what the rows have now
            kept = chunks["row_id"].isin(set(written)).to_numpy()
            runtime.vector_cache.keep_rows(
                conn,
                written + removed,
                list(
                    zip(
                        chunks["row_id"][kept],
                        chunks["chunk_index"][kept].astype(int),
                        chunks["chunk_hash"][kept],
                        strict=True,
                    )
                ),
                batch.vectors[kept],
            )
        failures = {**pending.failures, **batch.failures, **refused}
        runtime.errors.record(conn, pending.shard, failures)
        runtime.feed.acknowledge(conn, pending)
    runtime.release_shard(pending.shard)
    built, started = False, time.perf_counter()
    chunk_index_due = chunk_table and _index_deferred(runtime)
    if not pending.backlog and chunk_index_due and not _work_left(runtime):
        with runtime.engine.begin() as conn:
            built = runtime.pgvector.build_index(conn)
            runtime.ledger.set_vector_index(conn, "built")
    seconds = round(time.perf_counter() - started, 3) if built else 0.0
    column_index = False
    if (
        runtime.column is not None
        and not pending.backlog
        and runtime.column.index_missing()
        and not _work_left(runtime)
    ):
        column_index = runtime.column.build_index(live)
    return WriteStats(
        len(written),
        chunks_written,
        len(removed),
        len(stale),
        dropped,
        built,
        seconds,
        column_written,
        column_changed,
        column_index,
    )


def _index_deferred(runtime: SourceRuntime) -> bool:
    record = runtime.ledger.record()
    return record is not None and record.vector_index == "deferred"


def _work_left(runtime: SourceRuntime) -> bool:
    return any(rows for rows, _ in runtime.feed.work().values())
