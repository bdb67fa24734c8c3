"""The small protocol every Qdrant engine speaks (a server, the embedded engine), the points
and hits it exchanges, and the helpers both engines share. No Dagster here."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from embedding_assets.core.fusion import fuse

UPSERT_BATCH_SIZE = 512
DELETE_BATCH_SIZE = 2048
# Payload fields the pipeline filters on (reconciling a row, counting a shard).
PAYLOAD_INDEXES = {"row_id": "keyword", "shard": "integer"}


@dataclass(frozen=True)
class IndexPoint:
    """One chunk vector to store; ``id`` is a deterministic UUID string made by the caller."""

    id: str
    vector: Sequence[float] | np.ndarray
    # JSON-safe; always has "row_id" (str), "chunk_index" (int), "shard" (int), "text" (str).
    payload: dict[str, Any]
    # The text's term weights (indices, values) for the sparse `lexical` vector; None in a
    # collection without one.
    sparse: tuple[list[int], list[float]] | None = None


@dataclass(frozen=True)
class IndexHit:
    """A stored point as read back; ``score`` is cosine similarity (0.0 for ``retrieve``)."""

    id: str
    score: float
    payload: dict[str, Any]
    vector: np.ndarray | None = None  # only from retrieve(..., vectors=True)


@dataclass(frozen=True)
class IndexConfig:
    """A collection's search index (a server's; the embedded engine searches exactly)."""

    m: int = 16
    ef_construct: int = 100
    ef_search: int = 128  # hnsw_ef of each search (at least its limit)
    quantization: str = "none"  # or "scalar": int8 in RAM, rescored by the originals


DEFAULT_INDEX_CONFIG = IndexConfig()


@runtime_checkable
class QdrantStore(Protocol):
    """What the pipeline needs from a Qdrant deployment, server or embedded."""

    def ensure_collection(
        self,
        name: str,
        dimension: int,
        config: IndexConfig = DEFAULT_INDEX_CONFIG,
        lexical: bool = False,
    ) -> bool:
        """Create a cosine collection if missing (True if created), with the sparse
        `lexical` vector beside the dense one if asked; ValueError on a mismatch."""
        ...

    def collection_exists(self, name: str) -> bool: ...

    def has_lexical(self, name: str) -> bool:
        """Whether the collection has the sparse `lexical` vector (made with it)."""
        ...

    def delete_collection(self, name: str) -> bool:
        """Drop the collection and its points; False if there was none."""
        ...

    def upsert(self, name: str, points: Sequence[IndexPoint]) -> None:
        """Insert or replace points by id (idempotent); the collection must exist."""
        ...

    def delete(self, name: str, ids: Sequence[str]) -> None:
        """Remove points by id; unknown ids and a missing collection are fine."""
        ...

    def delete_shard(self, name: str, shard: int) -> None:
        """Remove every point whose payload ``shard`` is ``shard`` (a shard's full resync)."""
        ...

    def count(self, name: str, shard: int | None = None) -> int:
        """Exact number of points (with payload ``shard`` == shard); 0 if no collection."""
        ...

    def search(
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        shard: int | None = None,
        exact: bool = False,
        config: IndexConfig = DEFAULT_INDEX_CONFIG,
        mode: str = "dense",
        terms: tuple[list[int], list[float]] | None = None,
        lexical_weight: float = 1.0,
    ) -> list[IndexHit]:
        """Nearest points, best first (only the shard's, if given); [] if no collection.
        `dense`: by cosine similarity to `vector`, approximate with `config.ef_search`
        unless `exact`; `lexical`: by the sparse vector's score against the query `terms`;
        `hybrid`: the top candidates of both, fused by `fused_hits`."""
        ...

    def retrieve(self, name: str, ids: Sequence[str], vectors: bool = False) -> list[IndexHit]:
        """The stored points among ``ids`` (score 0.0), with their vectors if asked (to
        restore pgvector from Qdrant); [] if no collection."""
        ...

    def update_index_config(self, name: str, config: IndexConfig) -> bool:
        """Apply an edited HNSW / quantization config to an existing collection (a server
        rebuilds its index in the background); False where there is none to change (the
        embedded engine searches exactly)."""
        ...

    def keep_open(self) -> contextlib.AbstractContextManager[None]:
        """Keep collections opened in the block open until it ends (embedded store)."""
        ...

    # Readers of a server reach the live generation through an alias; the embedded engine
    # has none (its only reader, `search`, follows the ledger).
    supports_aliases: bool

    def alias_target(self, alias: str) -> str | None:
        """The collection `alias` points to, None if no such alias."""
        ...

    def point_alias(self, alias: str, collection: str) -> None:
        """Point `alias` at `collection`, atomically (readers see the old or the new)."""
        ...

    def brief(self) -> contextlib.AbstractContextManager[None]:
        """Within the block, release a collection after each operation even inside
        keep_open (embedded store): for a reader outside the store's Dagster pool, which
        must not hold the store while it waits for that pool."""
        ...

    def session(self, name: str) -> contextlib.AbstractContextManager[None]:
        """Group operations on one collection (embedded: one lock and open; server: no-op)."""
        ...

    def yield_to_waiters(self) -> list[str]:
        """Close the collections this thread keeps open that another process waits for
        (embedded store: the live lane, `search`), so it gets them now instead of when the
        run ends; they reopen on next use. Returns their names ([]: none, or a server)."""
        ...

    def close(self) -> None: ...


# --- helpers shared by both stores -------------------------------------------------------------


def fused_hits(
    rankings: Sequence[Sequence[IndexHit]], lexical_weight: float, limit: int
) -> list[IndexHit]:
    """The dense and the sparse hits (in that order) fused by reciprocal rank
    (`core.fusion`), the fused score in place of each engine's."""
    by_id = {hit.id: hit for ranking in rankings for hit in ranking}
    weights = (1.0, lexical_weight)
    fused = fuse([([h.id for h in r], w) for r, w in zip(rankings, weights, strict=True)], limit)
    return [replace(by_id[point], score=score) for point, score in fused]


def canonical_id(point_id: str | uuid.UUID) -> str:
    # Both engines accept several UUID spellings but answer in one; normalise on the way in so a
    # caller's id compares equal to the id it gets back.
    return str(uuid.UUID(str(point_id)))


def hit_id(raw: Any) -> str:
    if isinstance(raw, uuid.UUID):
        return str(raw)
    try:
        return canonical_id(raw)
    except ValueError:  # an integer id written by another tool: keep it readable
        return str(raw)


def vector_of(record: Any) -> np.ndarray | None:
    """A retrieved point's (single, unnamed) vector as float32."""
    vector = record.vector
    if isinstance(vector, dict):  # named vectors: ours has one, the default ""
        vector = vector.get("") if "" in vector else next(iter(vector.values()), None)
    return None if vector is None else np.asarray(vector, dtype=np.float32)


def as_floats(vector: Sequence[float] | np.ndarray) -> list[float]:
    # Plain lists convert ~2x faster than ndarrays inside both clients.
    return np.asarray(vector, dtype=np.float32).reshape(-1).tolist()


def shard_filter_args(shard: int) -> tuple[str, int]:
    # bool is an int: a True here would silently match shard 1.
    if isinstance(shard, bool) or not isinstance(shard, int | np.integer):
        raise TypeError(f"shard must be an int, got {shard!r}")
    return "shard", int(shard)


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def mismatch_error(name: str, found: str, dimension: int, fix: str) -> ValueError:
    return ValueError(
        f"Qdrant collection {name!r} exists with {found}, but this embedder needs "
        f"{dimension}-dimensional cosine vectors. Use another collection name (one collection "
        f"holds one model's vectors) or delete the collection ({fix}) and sync again."
    )


# --- embedded: Qdrant's engine in-process ------------------------------------------------------


# --- server: qdrant-client ---------------------------------------------------------------------
