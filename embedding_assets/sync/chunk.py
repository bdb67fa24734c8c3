"""The chunks stage: each pending row's composed text split into token-bounded chunks of the
embedder's own tokenizer."""

import pandas as pd

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.chunking import chunk_texts
from embedding_assets.core.delta import (
    CHUNK_COLUMNS,
    ChunkedRows,
    PendingRows,
)
from embedding_assets.embedders.base import Embedder


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
