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

    `rows` has PENDING_COLUMNS plus the metadata values as `m_0..m_n` (in the order of the
    source's `metadata` list, whatever the columns are called). `computed_at` is the
    database time the delta was read; a write skips rows stored after it (a newer run won).
    `version` is the pipeline version (model, chunking) the rows are to be embedded with.
    """

    source: str
    shard: int
    version: str
    computed_at: datetime
    rows: pd.DataFrame
    deleted: list[str]
    backlog: bool
    # Change-feed entries (entry id, row id) this read consumed; acknowledged with the write.
    consumed: list[tuple[int, str]] = field(default_factory=list)
    # Watermark feeds: the highest watermark value read, as text; stored with the write.
    watermark: str | None = None
    # Rows found unfit to write at read time (a duplicated id): recorded with the write.
    failures: dict[str, "RowFailure"] = field(default_factory=dict)
    # The source generation the rows are for (every later stage works on the same one).
    generation: int | None = None

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


@dataclass(frozen=True)
class RowFailure:
    """Why a row was not embedded this time (recorded in the error table)."""

    content_hash: str  # the content that failed
    # rejected | transient | bad_output (embedders.base.FailureKind); unstorable (Postgres
    # refused a value); duplicate_id (several rows share the id)
    kind: str
    message: str


@dataclass
class EmbeddedRows:
    chunked: ChunkedRows
    vectors: np.ndarray  # (len(chunked.chunks), dimension) float32, row-aligned with chunks
    embedded_chunks: int
    reused_chunks: int
    # Rows the embedder failed on: left out of the write, recorded in the error table.
    failures: dict[str, RowFailure] = field(default_factory=dict)
    model_id: str = ""  # the embedder that computed `vectors`; the write stamps it
    embedded_tokens: int = 0  # tokens sent to the embedder for them

    @property
    def pending(self) -> PendingRows:
        return self.chunked.pending


@dataclass
class IndexUpdate:
    """What Qdrant must change for one shard to match pgvector, and the state to record."""

    shard: int
    upserts: list = field(default_factory=list)  # destinations.qdrant_stores.IndexPoint
    deletes: list[str] = field(default_factory=list)
    synced: list[tuple[str, str | None, int]] = field(default_factory=list)  # row, hash, chunks
    backlog: bool = False
    collection: str = ""
    dimension: int = 0
    # The collection is missing, or its point count disagrees with the ledger: create it
    # and/or drop the shard's points and resend them all (the plan then covers every row).
    create_collection: bool = False
    reset_shard: bool = False
    generation: int | None = None
