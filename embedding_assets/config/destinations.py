"""Where a source's vectors go, as sources.yaml says: the pgvector chunk table, the Qdrant
collection, the write-back column."""

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from embedding_assets.config.base import Spec, off_as_disabled, split_qualified

# Qdrant refuses collection names with these characters (its storage uses them as paths).
QDRANT_NAME_FORBIDDEN = re.compile(r"[/\\\x00<>:\"|?*]")


class PgvectorHnswSpec(Spec):
    """pgvector's HNSW index. `m` and `ef_construction` apply when the index is built (a
    bulk load builds it once; drop it to rebuild with new values); `ef_search` is the
    candidate list of every search (pgvector's default, 40, misses exact matches among
    many near-duplicates); `iterative_scan` (pgvector >= 0.8) keeps scanning when a filter
    (a shard) removes candidates."""

    m: int = Field(default=16, ge=2, le=100)
    ef_construction: int = Field(default=64, ge=4, le=1000)
    ef_search: int = Field(default=200, ge=1, le=1000)
    iterative_scan: Literal["off", "relaxed_order", "strict_order"] = "relaxed_order"

    @model_validator(mode="after")
    def _ef_construction_covers_m(self) -> "PgvectorHnswSpec":
        if self.ef_construction < 2 * self.m:
            raise ValueError(
                f"pgvector.hnsw.ef_construction ({self.ef_construction}) must be at least "
                f"2 * m ({2 * self.m}), as pgvector requires; raise it or lower m"
            )
        return self


class PgvectorSpec(Spec):
    # false: no chunk table (a column-only source, see write_back).
    enabled: bool = True
    table: str | None = None
    hnsw: PgvectorHnswSpec = PgvectorHnswSpec()

    _off = model_validator(mode="before")(off_as_disabled)


class HybridSpec(Spec):
    """Lexical search beside the dense one: the chunk text as full text in the chunk table (a
    generated `tsvector` column with a GIN index), fused with the vector search by
    reciprocal rank fusion. `language` is a Postgres text search configuration: `simple`
    (no stemming, no stop words) keeps names, error codes and SKUs as they are written;
    `english` and the others stem words."""

    enabled: bool = True
    language: str = Field(default="simple", pattern=r"^[a-z][a-z0-9_]{0,62}$")
    # How much the lexical ranking counts in the fusion against the dense one's 1 (see
    # core.fusion: above 1, a known item found by its name or rare words stays on top).
    lexical_weight: float = Field(default=1.5, gt=0, le=10)

    @model_validator(mode="before")
    @classmethod
    def _on_or_off(cls, value):
        """`hybrid: false` / `hybrid: true` as shorthands."""
        return {"enabled": value} if isinstance(value, bool) else value


class WriteBackSpec(Spec):
    """One vector per row in a `vector(d)` column: of the source table itself, or of a 1:1
    side table keyed by the row's id (`table:`) for a source table this role may not alter."""

    column: str = Field(min_length=1, max_length=50)
    table: str | None = None
    model_column: str | None = Field(default=None, min_length=1, max_length=50)
    embedded_at_column: str | None = Field(default=None, min_length=1, max_length=50)
    # A row of several chunks: the mean of their vectors, renormalised, or the first's.
    row_vector: Literal["mean", "first_chunk"] = "mean"
    # hnsw: an index (cosine) on the column, built CONCURRENTLY once a bulk load is done.
    index: Literal["none", "hnsw"] = "none"

    @property
    def columns(self) -> list[str]:
        """The columns written: vector first, then the optional model and time columns."""
        return [c for c in (self.column, self.model_column, self.embedded_at_column) if c]

    @model_validator(mode="after")
    def _distinct_columns(self) -> "WriteBackSpec":
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"write_back names a column twice: {self.columns}")
        if self.table is not None:
            split_qualified(self.table)
        return self


class QdrantHnswSpec(Spec):
    """A Qdrant server's HNSW index, set when the collection is created; `ef_search` is
    each search's `hnsw_ef`. Qdrant's embedded engine always searches exactly."""

    m: int = Field(default=16, ge=0, le=100)
    ef_construct: int = Field(default=100, ge=4, le=1000)
    ef_search: int = Field(default=128, ge=1, le=10000)


class QdrantSpec(Spec):
    # false: no Qdrant collection (pgvector and/or the write-back column only).
    enabled: bool = True
    collection: str | None = None
    hnsw: QdrantHnswSpec = QdrantHnswSpec()
    # scalar: int8 vectors in RAM (4x smaller), searched with rescoring by the originals.
    quantization: Literal["none", "scalar"] = "none"

    _off = model_validator(mode="before")(off_as_disabled)

    @field_validator("collection")
    @classmethod
    def _valid_collection_name(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.strip()
            or len(value) > 255
            or value in (".", "..")
            or QDRANT_NAME_FORBIDDEN.search(value)
        ):
            raise ValueError(
                f"qdrant.collection {value!r} is not a valid Qdrant collection name: use 1-255 "
                'characters without / \\ : * ? " < > | or NUL (e.g. docs_chunks)'
            )
        return value
