"""The store stage: a shard's embedded rows written to every destination that is written in the
ledger's transaction, with the ledger, the error table and the change feed's acknowledgement,
all or nothing."""

from dataclasses import dataclass

import sqlalchemy as sa

from embedding_assets.core.delta import (
    EmbeddedRows,
    RowFailure,
)
from embedding_assets.destinations.base import RowsToWrite
from embedding_assets.state.ddl import shard_lock
from embedding_assets.state.write_counts import WriteCounts
from embedding_assets.sync.runtime import SourceRuntime


@dataclass(frozen=True)
class WriteStats:
    """What a store did: the ledger's figures, and each destination's in its own metadata keys."""

    rows_written: int
    chunks_written: int
    rows_deleted: int
    rows_skipped_stale: int
    metadata: dict[str, object]
    # Rows a destination refused (a value Postgres rejects, row-level security): in the
    # error table, as failed rows.
    rows_refused: int = 0


def store_embeddings(runtime: SourceRuntime, batch: EmbeddedRows) -> WriteStats:
    """Write every processed row to each destination written in the ledger's transaction, and
    remove deleted rows, in one transaction with the ledger and the change feed's
    acknowledgement. A row stored after this batch's delta was read (by a newer run) is
    skipped: the newer write wins and nothing regresses. Rows the embedder failed on, and rows
    a destination refused, are recorded in the error table in the same transaction; their
    feed entries are consumed with the rest (the error table retries them)."""
    if batch.model_id and batch.model_id != runtime.model_id:
        raise RuntimeError(
            f"embeddings of source {runtime.spec.name!r} were computed by {batch.model_id} "
            f"but the source now uses {runtime.model_id}; re-run the shard"
        )
    pending = batch.pending
    upsert_ids = pending.rows["row_id"].tolist()
    all_ids = upsert_ids + pending.deleted
    dimension = batch.vectors.shape[1] if batch.vectors.ndim == 2 else runtime.embedder.dimension
    enqueue = runtime.feed.mode != "diff"
    destinations = runtime.transactional
    if all_ids:
        runtime.ensure_target(dimension)
        # What a destination adds to the application's tables (the write-back column's ALTER
        # TABLE) happens in a short transaction of its own: that lock must not last the whole
        # write. The write checks again.
        with runtime.engine.begin() as conn:
            for destination in destinations:
                destination.prepare(conn, dimension, runtime.is_live, enqueue)
    metadata: dict[str, object] = {}
    for destination in destinations:
        metadata.update(destination.static_metadata())
    with runtime.engine.begin() as conn:
        shard_lock(conn, runtime.target, pending.shard)
        live = runtime.require_kept(conn) == "live"
        if all_ids:
            for destination in destinations:
                destination.prepare(conn, dimension, live, enqueue)
        stale = runtime.ledger.newer_rows(conn, all_ids, pending.computed_at) if all_ids else set()
        chunks = batch.chunked.chunks
        hashes = dict(zip(pending.rows["row_id"], pending.rows["content_hash"], strict=True))
        rows = RowsToWrite(
            batch,
            written=[r for r in upsert_ids if r not in stale],
            removed=[r for r in pending.deleted if r not in stale],
            hashes=hashes,
            model_id=runtime.model_id,
            live=live,
        )
        refused = _write_destinations(conn, destinations, rows, metadata)
        written = [r for r in rows.written if r not in refused]
        counts = chunks.groupby("row_id").size().to_dict() if len(chunks) else {}
        runtime.ledger.record_written(
            conn,
            pending.shard,
            written,
            [hashes[r] for r in written],
            [int(counts.get(r, 0)) for r in written],
        )
        runtime.ledger.record_deleted(conn, rows.removed)
        runtime.errors.clear(conn, written + rows.removed)
        _keep_chunk_vectors(runtime, conn, batch, written, rows.removed)
        failures = {**pending.failures, **batch.failures, **refused}
        dead = runtime.errors.record(conn, pending.shard, failures)
        WriteCounts(runtime.target).add(
            conn, pending.shard, len(written), len(rows.removed), len(failures), dead
        )
        runtime.feed.acknowledge(conn, pending)
    runtime.release_shard(pending.shard)
    if not pending.backlog:
        for destination in destinations:
            metadata.update(destination.build_index(live, lambda: _work_left(runtime)).metadata)
    unstored = int((~chunks["row_id"].isin(stale)).sum())  # without a chunk table
    return WriteStats(
        len(written),
        int(metadata.get("chunks_written", unstored)),
        len(rows.removed),
        len(stale),
        metadata,
        len(refused),
    )


def _write_destinations(
    conn: sa.Connection,
    destinations: list,
    rows: RowsToWrite,
    metadata: dict[str, object],
) -> dict[str, RowFailure]:
    """Every destination's write, in order, of the rows none of them refuses (asked before
    any writes, then what a write itself refuses is left out of the ones after it); their
    figures go to `metadata`. Returns the refused rows."""
    refused: dict[str, RowFailure] = {}
    for destination in destinations:
        refused.update(destination.refusals(conn, rows))
    for destination in destinations:
        done = destination.write(conn, rows.without(refused))
        metadata.update(done.metadata)
        refused.update(done.refused)
    return refused


def _keep_chunk_vectors(
    runtime: SourceRuntime,
    conn: sa.Connection,
    batch: EmbeddedRows,
    written: list[str],
    removed: list[str],
) -> None:
    """The vector cache after a write: with a chunk table, the chunks now stored there leave
    it (it held an interrupted run's progress); without one, it is the chunk vectors' store,
    and keeps what the rows have now."""
    chunks = batch.chunked.chunks
    if runtime.spec.pgvector.enabled:
        runtime.vector_cache.forget(conn, chunks["chunk_hash"].tolist())
        return
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


def _work_left(runtime: SourceRuntime) -> bool:
    return any(rows for rows, _ in runtime.feed.work().values())
