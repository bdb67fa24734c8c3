"""The embed stage: a shard's chunks turned into vectors, reusing the stored vectors of chunks
whose text did not change, within the daily token budget, with per-row failures kept apart.
Dagster assets, the CLI and tests call it; `sync.chunk` comes before, `sync.store` after."""

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pandas as pd

from embedding_assets.core.delta import (
    ChunkedRows,
    EmbeddedRows,
    RowFailure,
)
from embedding_assets.embedders.base import Embedder, InputFailure
from embedding_assets.sync.runtime import SourceRuntime


class QdrantNeeded(Exception):
    """Vectors to restore are in Qdrant, and this thread may not open its store (an
    embedded store is held by the run's own thread): embed the shard on that thread."""


def reusable_vectors(
    runtime: SourceRuntime, chunked: ChunkedRows, from_qdrant: bool = True
) -> dict[str, np.ndarray]:
    """Stored vectors for the chunks' texts: pgvector's by chunk hash (this generation's
    table, then other generations' of the same model), then the vector
    cache's (progress of an interrupted run); and for rows whose
    content is unchanged but whose chunks pgvector lost (see destinations.audit), the
    points Qdrant still holds with the same text (`from_qdrant=False`: raise QdrantNeeded
    instead of reading them)."""
    chunks = chunked.chunks
    hashes = chunks["chunk_hash"].tolist()
    found = (
        runtime.pgvector.reusable_vectors(hashes, runtime.same_model_tables)
        if runtime.spec.pgvector.enabled
        else {}
    )
    # What an interrupted run of this shard computed and could not store (without a chunk
    # table: every chunk vector the source's rows have).
    found.update(runtime.vector_cache.load([h for h in hashes if h not in found]))
    rows = chunked.pending.rows
    if not len(rows) or "stored_hash" not in rows or not runtime.spec.qdrant.enabled:
        return found
    unchanged = set(rows.loc[rows["stored_hash"] == rows["content_hash"], "row_id"])
    lacking = chunks[chunks["row_id"].isin(unchanged) & ~chunks["chunk_hash"].isin(found)]
    if len(lacking):
        if not from_qdrant:
            raise QdrantNeeded(f"{len(lacking)} chunks to restore from Qdrant")
        found.update(runtime.qdrant.restorable_vectors(lacking, runtime.model_id))
    return found


# A run with more new chunks than this embeds them in pieces of this size and hands each
# finished piece to `progress` (the vector cache), so an interruption loses one piece.
PROGRESS_CHUNKS = 512

Progress = Callable[[list[str], np.ndarray, int, int], None]


def embed_chunks(
    chunked: ChunkedRows,
    embedder: Embedder,
    reusable: dict[str, np.ndarray],
    progress: Progress | None = None,
) -> EmbeddedRows:
    """Vectors for every chunk: copied when its hash already has one, embedded otherwise.
    Identical new chunks are embedded once. With `progress`, more than PROGRESS_CHUNKS new
    chunks are embedded piece by piece, and each piece's (hashes, vectors, done, total) is
    passed to it as soon as it is embedded."""
    chunks = chunked.chunks
    dimension = embedder.dimension
    vectors = np.zeros((len(chunks), dimension), dtype=np.float32)
    missing = new_chunks(chunks, reusable, dimension)
    reused = np.ones(len(chunks), dtype=bool)
    for positions in missing.values():
        reused[positions] = False
    for position in np.flatnonzero(reused):
        vectors[position] = reusable[chunks["chunk_hash"].iat[position]]
    failures: dict[str, RowFailure] = {}
    if missing:
        first_texts = [chunks["text"].iat[positions[0]] for positions in missing.values()]
        fresh, failed = _embed_in_pieces(embedder, first_texts, list(missing), progress)
        rows = chunked.pending.rows
        hashes = dict(zip(rows["row_id"], rows["content_hash"], strict=True)) if failed else {}
        for index, (vector, positions) in enumerate(zip(fresh, missing.values(), strict=True)):
            vectors[positions] = vector
            if index in failed:
                for position in positions:
                    row_id = chunks["row_id"].iat[position]
                    failure = failed[index]
                    failures.setdefault(
                        row_id, RowFailure(hashes[row_id], failure.kind, failure.message)
                    )
    if failures:
        result = _without_rows(chunked, vectors, reused, failures)
    else:
        result = EmbeddedRows(
            chunked, vectors, int((~reused).sum()), reused_chunks=int(reused.sum())
        )
    result.model_id = embedder.model_id
    result.embedded_tokens = new_tokens(chunks, missing)
    return result


def new_chunks(
    chunks: pd.DataFrame, reusable: dict[str, np.ndarray], dimension: int
) -> dict[str, list[int]]:
    """{chunk hash: positions} of the chunks that need the embedder: no stored vector of
    this dimension for their text. Identical new texts are one entry (embedded once)."""
    missing: dict[str, list[int]] = {}
    for position, chunk_hash in enumerate(chunks["chunk_hash"]):
        stored = reusable.get(chunk_hash)
        if stored is None or stored.shape != (dimension,):
            missing.setdefault(chunk_hash, []).append(position)
    return missing


def new_tokens(chunks: pd.DataFrame, missing: dict[str, list[int]]) -> int:
    """Tokens the embedder is sent for `missing` (each distinct text once)."""
    counts = chunks["token_count"]
    return int(sum(int(counts.iat[positions[0]]) for positions in missing.values()))


def fit_token_budget(
    chunked: ChunkedRows, reusable: dict[str, np.ndarray], dimension: int, tokens_left: int
) -> tuple[ChunkedRows, list[str]]:
    """The rows whose new chunks fit in `tokens_left`, in order, and the ids of the rows
    deferred: they stay pending (their feed entries unconsumed) for a later run. Rows that
    need no new tokens and rows to delete always go through."""
    chunks = chunked.chunks
    missing = new_chunks(chunks, reusable, dimension)
    first_use: dict[str, int] = {}  # a text shared by rows is charged to the first one
    for positions in missing.values():
        row_id = chunks["row_id"].iat[positions[0]]
        first_use[row_id] = first_use.get(row_id, 0) + int(chunks["token_count"].iat[positions[0]])
    pending = chunked.pending
    deferred, spent = [], 0
    for row_id in pending.rows["row_id"].tolist():
        cost = first_use.get(row_id, 0)
        if cost and (deferred or spent + cost > tokens_left):
            deferred.append(row_id)
        else:
            spent += cost
    if not deferred:
        return chunked, []
    held = set(deferred)
    kept_pending = replace(
        pending,
        rows=pending.rows[~pending.rows["row_id"].isin(held)].reset_index(drop=True),
        consumed=[entry for entry in pending.consumed if entry[1] not in held],
        watermark=None,  # the mark stays: the deferred rows are read again
        backlog=True,
    )
    kept_chunks = chunks[~chunks["row_id"].isin(held)].reset_index(drop=True)
    return ChunkedRows(kept_pending, kept_chunks), deferred


class EmbedderUnavailableError(RuntimeError):
    """Every input of a run failed with a transient error: the embedder is down, not a row
    at fault. The run fails (the sensor retries it after a growing wait) and no row is
    charged an attempt, so an outage never makes rows dead."""


def _raise_if_unavailable(embedder: Embedder, failed: dict[int, InputFailure], inputs: int) -> None:
    if inputs > 1 and len(failed) == inputs and all(f.kind == "transient" for f in failed.values()):
        example = next(iter(failed.values())).message
        raise EmbedderUnavailableError(
            f"{embedder.model_id} failed all {inputs} inputs of this run with transient "
            f"errors ({example}); nothing was stored and no row was charged an attempt. "
            "The run is retried after a growing wait; check that the embedder is up."
        )


def _embed_in_pieces(
    embedder: Embedder, texts: list[str], hashes: list[str], progress: Progress | None
) -> tuple[np.ndarray, dict[int, InputFailure]]:
    """With `progress` and more than PROGRESS_CHUNKS texts: pieces of at most that size
    (evenly sized, so 513 texts are two of 257, not 512 and 1), each handed to `progress`
    on a writer thread while the model embeds the next piece. One write at most is in
    flight, so memory stays bounded and a failed write stops the run at the next piece."""
    count = max(1, math.ceil(len(texts) / PROGRESS_CHUNKS)) if progress is not None else 1
    size = max(1, math.ceil(len(texts) / count))
    pieces, failed = [], {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="progress-writer") as writer:
        in_flight: Future | None = None
        for start in range(0, len(texts), size):
            piece = texts[start : start + size]
            vectors, piece_failed = _embed(embedder, piece)
            _raise_if_unavailable(embedder, piece_failed, len(piece))
            pieces.append(vectors)
            failed.update({start + i: f for i, f in piece_failed.items()})
            if progress is not None and count > 1:
                if in_flight is not None:
                    in_flight.result()  # raises the writer's error here
                keep = [i for i in range(len(piece)) if i not in piece_failed]
                in_flight = writer.submit(
                    progress,
                    [hashes[start + i] for i in keep],
                    vectors[keep],
                    start + len(piece),
                    len(texts),
                )
        if in_flight is not None:
            in_flight.result()
    return np.concatenate(pieces) if pieces else np.zeros((0, embedder.dimension)), failed


def _embed(embedder: Embedder, texts: list[str]) -> tuple[np.ndarray, dict[int, InputFailure]]:
    """Vectors and {input index: failure} for inputs the embedder could not embed. Remote
    embedders narrow a bad answer down to its input, so the rest of the batch is embedded."""
    partial = getattr(embedder, "embed_documents_partial", None)
    if partial is not None:
        return partial(texts)
    return embedder.embed_documents(texts), {}


def _without_rows(
    chunked: ChunkedRows,
    vectors: np.ndarray,
    reused: np.ndarray,
    failures: dict[str, RowFailure],
) -> EmbeddedRows:
    """Drop rows with a failed chunk from the write (never half-stored); the write records
    them in the error table."""
    pending = chunked.pending
    keep_rows = ~pending.rows["row_id"].isin(failures.keys())
    keep_chunks = ~chunked.chunks["row_id"].isin(failures.keys()).to_numpy()
    kept = ChunkedRows(
        replace(pending, rows=pending.rows[keep_rows].reset_index(drop=True)),
        chunked.chunks[keep_chunks].reset_index(drop=True),
    )
    kept_reused = reused[keep_chunks]
    return EmbeddedRows(
        kept,
        vectors[keep_chunks],
        int((~kept_reused).sum()),
        int(kept_reused.sum()),
        failures,
    )
