"""The values that flow between a shard's stages: pending rows, their chunks, their vectors."""

from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

PENDING_COLUMNS = ["row_id", "doc", "is_empty", "content_hash"]
CHUNK_COLUMNS = ["row_id", "chunk_index", "text", "token_count", "chunk_hash"]


@dataclass
class PendingRows:
    """What one shard needs now: rows to (re)embed and row ids to remove.

    `rows` has PENDING_COLUMNS plus one column per metadata column. `computed_at` is the
    database time the delta was read; a write skips rows stored after it (a newer run won).
    """

    source: str
    shard: int
    version: str
    computed_at: datetime
    rows: pd.DataFrame
    deleted: list[str]
    backlog: bool

    @property
    def empty_rows(self) -> int:
        return int(self.rows["is_empty"].sum()) if len(self.rows) else 0


@dataclass
class ChunkedRows:
    pending: PendingRows
    chunks: pd.DataFrame  # CHUNK_COLUMNS

    @property
    def tokens(self) -> int:
        return int(self.chunks["token_count"].sum()) if len(self.chunks) else 0


@dataclass
class EmbeddedRows:
    chunked: ChunkedRows
    vectors: np.ndarray  # (len(chunked.chunks), dimension) float32, row-aligned with chunks
    embedded_chunks: int
    reused_chunks: int
    # Rows the embedder rejected: left out of the write (they stay pending), with the reason.
    failures: dict[str, str] = field(default_factory=dict)

    @property
    def pending(self) -> PendingRows:
        return self.chunked.pending


@dataclass
class IndexUpdate:
    """What Qdrant must change for one shard to match pgvector, and the state to record."""

    shard: int
    upserts: list = field(default_factory=list)  # stores.qdrant.IndexPoint
    deletes: list[str] = field(default_factory=list)
    synced: list[tuple[str, str | None, int]] = field(default_factory=list)  # row, hash, chunks
    backlog: bool = False
