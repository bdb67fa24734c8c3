"""The stages of a shard sync as plain functions: chunk, embed (reusing stored vectors), and
store (pgvector + ledger + change-feed acknowledgement in one transaction). The Qdrant
stage lives in `destinations.qdrant`. Dagster assets, IO managers and tests call these."""

import time
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from embedding_assets.core.chunking import chunk_texts
from embedding_assets.core.delta import CHUNK_COLUMNS, ChunkedRows, EmbeddedRows, PendingRows
from embedding_assets.embedders.base import Embedder
from embedding_assets.runtime import SourceRuntime
from embedding_assets.settings import SourceSpec
from embedding_assets.state.ddl import shard_lock


def effective_max_tokens(spec: SourceSpec, embedder: Embedder) -> int:
    """Chunks never exceed `max_tokens` nor what the model embeds without truncation."""
    return min(spec.chunking.max_tokens, embedder.max_input_tokens)


def chunk_rows(pending: PendingRows, spec: SourceSpec, embedder: Embedder) -> ChunkedRows:
    max_tokens = effective_max_tokens(spec, embedder)
    overlap = min(spec.chunking.overlap, max_tokens - 1)
    rows = pending.rows
    # NULL/blank text: the row is recorded with no chunks, never embedded.
    texts = rows.loc[~rows["is_empty"].astype(bool), ["row_id", "doc"]] if len(rows) else rows
    records = []
    chunked = chunk_texts(texts["doc"].tolist(), embedder.tokenizer, max_tokens, overlap)
    for row_id, chunks in zip(texts["row_id"].tolist(), chunked, strict=True):
        for chunk in chunks:
            records.append(
                (row_id, chunk.chunk_index, chunk.text, chunk.token_count, chunk.chunk_hash)
            )
    return ChunkedRows(pending, pd.DataFrame(records, columns=CHUNK_COLUMNS))


def embed_chunks(
    chunked: ChunkedRows, embedder: Embedder, reusable: dict[str, np.ndarray]
) -> EmbeddedRows:
    """Vectors for every chunk: copied when its hash already has one, embedded otherwise.
    Identical new chunks are embedded once."""
    chunks = chunked.chunks
    dimension = embedder.dimension
    vectors = np.zeros((len(chunks), dimension), dtype=np.float32)
    missing: dict[str, list[int]] = {}
    reused = 0
    for position, chunk_hash in enumerate(chunks["chunk_hash"]):
        stored = reusable.get(chunk_hash)
        if stored is not None and stored.shape == (dimension,):
            vectors[position] = stored
            reused += 1
        else:
            missing.setdefault(chunk_hash, []).append(position)
    failures: dict[str, str] = {}
    if missing:
        first_texts = [chunks["text"].iat[positions[0]] for positions in missing.values()]
        fresh, failed = _embed(embedder, first_texts)
        for index, (vector, positions) in enumerate(zip(fresh, missing.values(), strict=True)):
            vectors[positions] = vector
            if index in failed:
                for position in positions:
                    failures.setdefault(chunks["row_id"].iat[position], failed[index])
    embedded = len(chunks) - reused
    if failures:
        result = _without_rows(chunked, vectors, embedded, reused, failures)
    else:
        result = EmbeddedRows(chunked, vectors, embedded_chunks=embedded, reused_chunks=reused)
    result.model_id = embedder.model_id
    return result


def _embed(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, dict[int, str]]:
    """Vectors and {input index: reason} for inputs the embedder rejected. Remote embedders
    isolate a rejected input so the rest of the batch is still embedded."""
    partial = getattr(embedder, "embed_documents_partial", None)
    if partial is not None:
        return partial(texts)
    return embedder.embed_documents(texts), {}


def _without_rows(
    chunked: ChunkedRows,
    vectors: np.ndarray,
    embedded: int,
    reused: int,
    failures: dict[str, str],
) -> EmbeddedRows:
    """Drop rows with a rejected chunk from the write; they stay pending (never half-stored)."""
    pending = chunked.pending
    keep_rows = ~pending.rows["row_id"].isin(failures.keys())
    keep_chunks = ~chunked.chunks["row_id"].isin(failures.keys()).to_numpy()
    kept = ChunkedRows(
        replace(pending, rows=pending.rows[keep_rows].reset_index(drop=True)),
        chunked.chunks[keep_chunks].reset_index(drop=True),
    )
    return EmbeddedRows(kept, vectors[keep_chunks], embedded, reused, failures)


@dataclass(frozen=True)
class WriteStats:
    rows_written: int
    chunks_written: int
    rows_deleted: int
    rows_skipped_stale: int
    index_dropped: bool = False
    index_built: bool = False
    index_seconds: float = 0.0


def store_embeddings(runtime: SourceRuntime, batch: EmbeddedRows) -> WriteStats:
    """Replace the chunks of every processed row and remove deleted rows, in one transaction
    with the ledger and the change feed's acknowledgement. A row stored after this batch's
    delta was read (by a newer run) is skipped: the newer write wins and nothing regresses.
    Rows the embedder rejected stay in the feed for a later run."""
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
    with runtime.engine.begin() as conn:
        shard_lock(conn, runtime.target, pending.shard)
        stale = runtime.ledger.newer_rows(conn, all_ids, pending.computed_at) if all_ids else set()
        dropped = runtime.pgvector.drop_index_for_rewrite(conn, len(batch.chunked.chunks))
        if dropped:
            runtime.ledger.set_vector_index(conn, "deferred")
        chunks_written = runtime.pgvector.replace_rows(conn, batch, stale, runtime.model_id)
        chunks = batch.chunked.chunks
        counts = chunks.groupby("row_id").size().to_dict() if len(chunks) else {}
        hashes = dict(zip(pending.rows["row_id"], pending.rows["content_hash"], strict=True))
        written = [r for r in upsert_ids if r not in stale]
        runtime.ledger.record_written(
            conn,
            pending.shard,
            written,
            [hashes[r] for r in written],
            [int(counts.get(r, 0)) for r in written],
        )
        removed = [r for r in pending.deleted if r not in stale]
        runtime.ledger.record_deleted(conn, removed)
        runtime.feed.acknowledge(conn, pending, set(batch.failures))
    built, started = False, time.perf_counter()
    if not pending.backlog and _index_deferred(runtime) and not _work_left(runtime):
        with runtime.engine.begin() as conn:
            built = runtime.pgvector.build_index(conn)
            runtime.ledger.set_vector_index(conn, "built")
    seconds = round(time.perf_counter() - started, 3) if built else 0.0
    return WriteStats(
        len(written), chunks_written, len(removed), len(stale), dropped, built, seconds
    )


def _index_deferred(runtime: SourceRuntime) -> bool:
    record = runtime.ledger.record()
    return record is not None and record.vector_index == "deferred"


def _work_left(runtime: SourceRuntime) -> bool:
    return any(rows for rows, _ in runtime.feed.work().values())
