"""The stages of a shard sync as plain functions: chunk, embed (reusing stored vectors),
and plan/apply the Qdrant update. Dagster assets, the CLI and tests call these."""

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from embedding_assets.core.chunking import chunk_text
from embedding_assets.core.delta import (
    CHUNK_COLUMNS,
    ChunkedRows,
    EmbeddedRows,
    IndexUpdate,
    PendingRows,
)
from embedding_assets.core.ids import point_id
from embedding_assets.embedders.base import Embedder
from embedding_assets.settings import SourceSpec
from embedding_assets.stores.pgvector import PgVectorStore, json_safe
from embedding_assets.stores.qdrant import IndexPoint, QdrantStore


def effective_max_tokens(spec: SourceSpec, embedder: Embedder) -> int:
    """Chunks never exceed `max_tokens` nor what the model embeds without truncation."""
    return min(spec.chunking.max_tokens, embedder.max_input_tokens)


def chunk_rows(pending: PendingRows, spec: SourceSpec, embedder: Embedder) -> ChunkedRows:
    max_tokens = effective_max_tokens(spec, embedder)
    overlap = min(spec.chunking.overlap, max_tokens - 1)
    records = []
    for row in pending.rows.itertuples(index=False):
        if row.is_empty:
            continue  # NULL/blank text: the row is recorded with no chunks, never embedded
        for chunk in chunk_text(row.doc, embedder.tokenizer, max_tokens, overlap):
            records.append(
                (row.row_id, chunk.chunk_index, chunk.text, chunk.token_count, chunk.chunk_hash)
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
        return _without_rows(chunked, vectors, embedded, reused, failures)
    return EmbeddedRows(chunked, vectors, embedded_chunks=embedded, reused_chunks=reused)


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
class PlanStats:
    lag_rows: int
    reconciled: bool
    created_collection: bool


def plan_index_update(
    spec: SourceSpec,
    pg: PgVectorStore,
    qdrant: QdrantStore,
    shard: int,
    dimension: int,
    limit: int,
) -> tuple[IndexUpdate, PlanStats]:
    """What Qdrant must change so the shard's points equal pgvector's chunks.

    Derived from durable state, not from what this run produced, so a crash between the
    pgvector and Qdrant writes is repaired by the next run. If Qdrant's point count for
    the shard disagrees with what the state says it holds (store wiped, points removed by
    hand, a crash mid-upsert), the shard's points are dropped and resent from pgvector.
    """
    collection = spec.qdrant_collection
    with qdrant.session(collection):
        created = qdrant.ensure_collection(collection, dimension)
        if created:
            pg.forget_qdrant()
        reconciled = False
        if qdrant.count(collection, shard=shard) != pg.qdrant_expected_points(shard):
            qdrant.delete_shard(collection, shard)
            pg.forget_qdrant(shard)
            reconciled = True
    lag, chunks = pg.qdrant_lag(shard, limit)
    update = IndexUpdate(shard=shard, backlog=len(lag) >= limit)
    for row in chunks.itertuples(index=False):
        payload = {
            "row_id": row.row_id,
            "chunk_index": int(row.chunk_index),
            "shard": shard,
            "text": row.chunk_text,
        }
        for name in spec.metadata:
            payload[name] = json_safe(getattr(row, name))
        update.upserts.append(IndexPoint(id=row.point_id, vector=row.embedding, payload=payload))
    for row in lag.itertuples(index=False):
        # Points past the row's new chunk count are stale (all of them for a deleted row).
        update.deletes.extend(
            point_id(spec.name, row.row_id, index, pg.model_id)
            for index in range(int(row.chunk_count), int(row.qdrant_chunk_count))
        )
        update.synced.append((row.row_id, row.content_hash, int(row.chunk_count)))
    return update, PlanStats(len(lag), reconciled, created)


def apply_index_update(
    spec: SourceSpec, pg: PgVectorStore, qdrant: QdrantStore, update: IndexUpdate
) -> None:
    collection = spec.qdrant_collection
    with qdrant.session(collection):
        if update.deletes:
            qdrant.delete(collection, update.deletes)
        if update.upserts:
            qdrant.upsert(collection, update.upserts)
    # Recorded only after Qdrant has the points: a crash before this line resends them.
    pg.mark_qdrant_synced(update.synced)
