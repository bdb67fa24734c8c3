"""Qdrant collections for the vector_index stage: a Qdrant server or Qdrant's engine embedded.

``ServerQdrantStore`` talks to a server through qdrant-client (``QDRANT_URL``);
``EmbeddedQdrantStore`` runs Qdrant's own engine in-process (qdrant-edge, one shard directory
per collection) when no URL is configured. Both speak the small ``QdrantStore`` protocol that
the IO manager, the asset checks and the CLI use. No Dagster here.

Facts about qdrant-edge 0.9 that shape the embedded store (measured on 2 cores, 384-d):

- A shard takes a non-blocking lock on its WAL: a second ``EdgeShard.load`` of the same path,
  in this or another process, fails at once with ``Can't init WAL: Kind(WouldBlock)``. So every
  operation opens the shard under our own *waiting* ``flock`` and closes it before releasing.
- Opening a shard of 10k points takes 40-90 ms (60-100 ms on a busy machine) and closing it
  5-70 ms, as it syncs the WAL; upserts run at 10-20k points/s. Sessions amortize the open.
- ``EdgeShard.retrieve`` needs ``with_vector`` passed, despite the stub's default.
- Updates go to a WAL that is replayed on load, so even a killed writer loses nothing applied.
- The engine never optimizes on its own (``optimize()`` is explicit): segments stay plain, so
  search is exact brute force. We do not call it: on 100k points it took 117 s and made
  neither opening nor searching the shard faster (measured here, 2 cores).
- Point ids come back as ``uuid.UUID`` objects; both stores return canonical ``str(UUID)``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import qdrant_edge as edge

if TYPE_CHECKING:
    # Importing qdrant-client costs ~1.5 s; only the server store needs it, at run time.
    import qdrant_client
    from qdrant_client import models as qdrant_models

__all__ = [
    "EmbeddedQdrantStore",
    "IndexConfig",
    "IndexHit",
    "IndexPoint",
    "QdrantStore",
    "ServerQdrantStore",
    "open_qdrant_store",
]

log = logging.getLogger(__name__)

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


@runtime_checkable
class QdrantStore(Protocol):
    """What the pipeline needs from a Qdrant deployment, server or embedded."""

    def ensure_collection(
        self, name: str, dimension: int, config: IndexConfig = IndexConfig()
    ) -> bool:
        """Create a cosine collection if missing (True if created); ValueError on a mismatch."""
        ...

    def collection_exists(self, name: str) -> bool: ...

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
        config: IndexConfig = IndexConfig(),
    ) -> list[IndexHit]:
        """Nearest points by cosine similarity, best first (only the shard's, if given);
        approximate with `config.ef_search` unless `exact`; [] if no collection."""
        ...

    def retrieve(self, name: str, ids: Sequence[str], vectors: bool = False) -> list[IndexHit]:
        """The stored points among ``ids`` (score 0.0), with their vectors if asked (to
        restore pgvector from Qdrant); [] if no collection."""
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

    def close(self) -> None: ...


IN_MEMORY = ":memory:"


def open_qdrant_store(url: str | None, api_key: str | None, embedded_root: Path) -> QdrantStore:
    """A server store when ``url`` is set (``QDRANT_URL``), else the embedded engine.

    ``:memory:`` is qdrant-client's in-process mode: the server code path without a server,
    living as long as the process (tests, trying things out)."""
    if url == IN_MEMORY:
        from qdrant_client import QdrantClient

        return ServerQdrantStore(QdrantClient(location=IN_MEMORY), description=IN_MEMORY)
    if url:
        return ServerQdrantStore.from_url(url, api_key)
    return EmbeddedQdrantStore(embedded_root)


# --- helpers shared by both stores -------------------------------------------------------------


def _canonical_id(point_id: str | uuid.UUID) -> str:
    # Both engines accept several UUID spellings but answer in one; normalise on the way in so a
    # caller's id compares equal to the id it gets back.
    return str(uuid.UUID(str(point_id)))


def _hit_id(raw: Any) -> str:
    if isinstance(raw, uuid.UUID):
        return str(raw)
    try:
        return _canonical_id(raw)
    except ValueError:  # an integer id written by another tool: keep it readable
        return str(raw)


def _vector_of(record: Any) -> np.ndarray | None:
    """A retrieved point's (single, unnamed) vector as float32."""
    vector = record.vector
    if isinstance(vector, dict):  # named vectors: ours has one, the default ""
        vector = vector.get("") if "" in vector else next(iter(vector.values()), None)
    return None if vector is None else np.asarray(vector, dtype=np.float32)


def _as_floats(vector: Sequence[float] | np.ndarray) -> list[float]:
    # Plain lists convert ~2x faster than ndarrays inside both clients.
    return np.asarray(vector, dtype=np.float32).reshape(-1).tolist()


def _shard_filter_args(shard: int) -> tuple[str, int]:
    # bool is an int: a True here would silently match shard 1.
    if isinstance(shard, bool) or not isinstance(shard, int | np.integer):
        raise TypeError(f"shard must be an int, got {shard!r}")
    return "shard", int(shard)


def _batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _mismatch_error(name: str, found: str, dimension: int, fix: str) -> ValueError:
    return ValueError(
        f"Qdrant collection {name!r} exists with {found}, but this embedder needs "
        f"{dimension}-dimensional cosine vectors. Use another collection name (one collection "
        f"holds one model's vectors) or delete the collection ({fix}) and sync again."
    )


# --- embedded: Qdrant's engine in-process ------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge at create; holds size and distance


@dataclass
class _Handle:
    """One collection while this thread holds its lock; the shard is opened on first use."""

    path: Path
    shard: edge.EdgeShard | None = None
    dirty: bool = False  # written to since opened: flush before closing

    @property
    def exists(self) -> bool:
        return (self.path / _CONFIG_FILE).is_file()

    def load(self) -> edge.EdgeShard | None:
        """The open shard, or None if the collection does not exist."""
        if self.shard is None and self.exists:
            self.shard = edge.EdgeShard.load(str(self.path))
        return self.shard


class EmbeddedQdrantStore:
    """Collections as qdrant-edge shards under ``root/<collection>``, safe across processes.

    Every operation takes an exclusive ``flock`` on ``root/.<collection>.lock``, opens the shard,
    works, flushes, closes and releases, so a Dagster run, the CLI and tests can share a root.
    Wrap several operations in ``with store.session(name):`` to open and close only once.
    """

    def __init__(self, root: Path, *, lock_timeout_s: float = 600.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s = lock_timeout_s
        # Sessions are per thread: another thread must queue on the lock, not share the shard.
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"EmbeddedQdrantStore(root={str(self.root)!r})"

    # -- the protocol --

    def ensure_collection(
        self, name: str, dimension: int, config: IndexConfig = IndexConfig()
    ) -> bool:
        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        with self._open(name) as handle:
            if handle.exists:  # the config file answers this; no need to open the shard
                self._check_config(name, handle.path, dimension)
                return False
            self._create(handle.path, dimension)
            log.info("created embedded Qdrant collection %r (%d-d, cosine)", name, dimension)
            return True

    def collection_exists(self, name: str) -> bool:
        return (self._path(name) / _CONFIG_FILE).is_file()

    def delete_collection(self, name: str) -> bool:
        if self._handles().get(name) is not None:
            raise RuntimeError(f"cannot delete collection {name!r} inside its own session")
        with self._open(name) as handle:
            if not handle.exists:
                return False
            # Rename first so collection_exists() never sees a half-deleted shard.
            trash = handle.path.with_name(f".{handle.path.name}.deleting")
            shutil.rmtree(trash, ignore_errors=True)
            handle.path.rename(trash)
            shutil.rmtree(trash)
            return True

    def upsert(self, name: str, points: Sequence[IndexPoint]) -> None:
        if not points:
            return
        with self._open(name) as handle:
            shard = handle.load()
            if shard is None:
                raise ValueError(
                    f"embedded Qdrant collection {name!r} does not exist; "
                    "call ensure_collection first"
                )
            handle.dirty = True
            for batch in _batches(points, UPSERT_BATCH_SIZE):
                shard.update(
                    edge.UpdateOperation.upsert_points(
                        [
                            edge.Point(_canonical_id(p.id), _as_floats(p.vector), p.payload)
                            for p in batch
                        ]
                    )
                )

    def delete(self, name: str, ids: Sequence[str]) -> None:
        if not ids:
            return
        with self._open(name) as handle:
            shard = handle.load()
            if shard is None:
                return
            handle.dirty = True
            for batch in _batches(ids, DELETE_BATCH_SIZE):
                shard.update(edge.UpdateOperation.delete_points([_canonical_id(i) for i in batch]))

    def delete_shard(self, name: str, shard: int) -> None:
        flt = self._shard_filter(shard)
        with self._open(name) as handle:
            edge_shard = handle.load()
            if edge_shard is None:
                return
            handle.dirty = True
            edge_shard.update(edge.UpdateOperation.delete_points_by_filter(flt))

    def count(self, name: str, shard: int | None = None) -> int:
        flt = None if shard is None else self._shard_filter(shard)
        with self._open(name) as handle:
            edge_shard = handle.load()
            if edge_shard is None:
                return 0
            return edge_shard.count(edge.CountRequest(exact=True, filter=flt))

    def search(
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        shard: int | None = None,
        exact: bool = False,
        config: IndexConfig = IndexConfig(),
    ) -> list[IndexHit]:
        # The engine never builds an HNSW graph (see above): every search is exact.
        if limit < 1:
            return []
        with self._open(name) as handle:
            edge_shard = handle.load()
            if edge_shard is None:
                return []
            request = edge.QueryRequest(
                limit=limit,
                query=edge.Query.Nearest(_as_floats(vector)),
                filter=None if shard is None else self._shard_filter(shard),
                with_payload=True,
                with_vector=False,
            )
            scored = edge_shard.query(request)
        return [IndexHit(_hit_id(p.id), float(p.score), dict(p.payload or {})) for p in scored]

    def retrieve(self, name: str, ids: Sequence[str], vectors: bool = False) -> list[IndexHit]:
        if not ids:
            return []
        with self._open(name) as handle:
            shard = handle.load()
            if shard is None:
                return []
            records = shard.retrieve([_canonical_id(i) for i in ids], True, vectors)
        return [
            IndexHit(_hit_id(r.id), 0.0, dict(r.payload or {}), _vector_of(r) if vectors else None)
            for r in records
        ]

    def close(self) -> None:
        # Nothing stays open between operations; sessions close their own shards.
        return None

    supports_aliases = False

    def alias_target(self, alias: str) -> str | None:
        return None

    def point_alias(self, alias: str, collection: str) -> None:
        raise NotImplementedError("Qdrant's embedded engine has no aliases")

    # -- sessions and locking --

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[None]:
        """Hold the collection's lock, and its shard once opened, for the whole block."""
        with self._open(name):
            yield

    @contextlib.contextmanager
    def keep_open(self) -> Iterator[None]:
        """Within the block, a collection this thread opens stays open (and locked) until
        the block ends, instead of closing after each operation: opening a large shard costs
        more than most operations on it. The lock is taken on first use, not on entry."""
        if getattr(self._local, "keeping", None) is not None:
            yield  # already keeping: the outer block closes
            return
        self._local.keeping = contextlib.ExitStack()
        try:
            with self._local.keeping:
                yield
        finally:
            self._local.keeping = None

    @contextlib.contextmanager
    def brief(self) -> Iterator[None]:
        keeping = getattr(self._local, "keeping", None)
        self._local.keeping = None  # collections this block opens close after each use
        try:
            yield
        finally:
            self._local.keeping = keeping

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[_Handle]:
        handles = self._handles()
        if name in handles:  # inside this thread's session: reuse (a 2nd flock would deadlock)
            yield handles[name]
            return
        keeping = getattr(self._local, "keeping", None)
        if keeping is not None:
            handle = keeping.enter_context(self._held(name))
            yield handle
            return
        with self._held(name) as handle:
            yield handle

    @contextlib.contextmanager
    def _held(self, name: str) -> Iterator[_Handle]:
        handles = self._handles()
        path = self._path(name)
        # Hidden, so no collection name (never starting with ".") can collide with it.
        with self._locked(path.with_name(f".{path.name}.lock")):
            handle = handles[name] = _Handle(path)
            try:
                yield handle
            finally:
                del handles[name]
                if handle.shard is not None:
                    # Flush + close before the lock goes: the next holder must see our writes.
                    # Reads skip the flush: each one costs fsyncs (40-100 ms on this disk).
                    try:
                        if handle.dirty:
                            handle.shard.flush()
                    finally:
                        handle.shard.close()

    @contextlib.contextmanager
    def _locked(self, lock_path: Path) -> Iterator[None]:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    # Poll rather than block so a stuck holder gives a clear error, not a hang.
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"another process has held {lock_path} for over "
                            f"{self.lock_timeout_s:.0f} s (only one process may open an "
                            f"embedded Qdrant collection at a time)"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _handles(self) -> dict[str, _Handle]:
        handles: dict[str, _Handle] | None = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        return handles

    @staticmethod
    def _shard_filter(shard: int) -> edge.Filter:
        key, value = _shard_filter_args(shard)
        return edge.Filter(must=[edge.FieldCondition(key=key, match=edge.MatchValue(value))])

    # -- shard files --

    def _path(self, name: str) -> Path:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"invalid collection name {name!r}: use letters, digits, '_', '-' or '.', "
                "starting with a letter or digit (it names a directory)"
            )
        return self.root / name

    @staticmethod
    def _create(path: Path, dimension: int) -> None:
        # Build beside the target and rename, so a crash never leaves a half-made collection
        # that collection_exists() would report.
        tmp = path.with_name(f".{path.name}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        config = edge.EdgeConfig(
            vectors=edge.EdgeVectorParams(size=dimension, distance=edge.Distance.Cosine)
        )
        shard = edge.EdgeShard.create(str(tmp), config)
        try:
            schemas = {
                "keyword": edge.PayloadSchemaType.Keyword,
                "integer": edge.PayloadSchemaType.Integer,
            }
            for field, kind in PAYLOAD_INDEXES.items():
                shard.update(edge.UpdateOperation.create_field_index(field, schemas[kind]))
            shard.flush()
        finally:
            shard.close()
        tmp.rename(path)

    @staticmethod
    def _check_config(name: str, path: Path, dimension: int) -> None:
        try:
            stored = json.loads((path / _CONFIG_FILE).read_text())["vectors"][""]
            size, distance = int(stored["size"]), str(stored["distance"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(
                f"cannot read the vector config of embedded Qdrant collection {name!r} "
                f"from {path / _CONFIG_FILE}: {exc}"
            ) from exc
        if size != dimension or distance.lower() != "cosine":
            raise _mismatch_error(
                name, f"{size}-dimensional {distance} vectors", dimension, f"remove {path}"
            )


# --- server: qdrant-client ---------------------------------------------------------------------


def _redact_url(url: str) -> str:
    # A URL may carry credentials (https://user:secret@host); keep only scheme, host and path.
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ServerQdrantStore:
    """Collections on a Qdrant server (or qdrant-client's ``:memory:`` mode in tests)."""

    def __init__(self, client: qdrant_client.QdrantClient, *, description: str = "client") -> None:
        self._client = client
        self._description = description  # what repr shows; never the API key

    @classmethod
    def from_url(
        cls,
        url: str,
        api_key: str | None,
        *,
        timeout_s: int = 60,
        check_compatibility: bool = True,
    ) -> ServerQdrantStore:
        from qdrant_client import QdrantClient

        client = QdrantClient(
            url=url,
            api_key=api_key,
            timeout=timeout_s,
            check_compatibility=check_compatibility,  # a version probe in a background thread
        )
        return cls(client, description=f"url={_redact_url(url)!r}")

    def __repr__(self) -> str:
        return f"ServerQdrantStore({self._description})"

    def ensure_collection(
        self, name: str, dimension: int, config: IndexConfig = IndexConfig()
    ) -> bool:
        from qdrant_client import models

        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        created = False
        if not self._client.collection_exists(name):
            quantization = None
            if config.quantization == "scalar":
                quantization = models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, always_ram=True
                    )
                )
            try:
                self._client.create_collection(
                    name,
                    vectors_config=models.VectorParams(
                        size=dimension, distance=models.Distance.COSINE
                    ),
                    hnsw_config=models.HnswConfigDiff(m=config.m, ef_construct=config.ef_construct),
                    quantization_config=quantization,
                )
                created = True
                log.info("created Qdrant collection %r (%d-d, cosine)", name, dimension)
            except Exception:
                # Another writer may have created it between our check and our create.
                if not self._client.collection_exists(name):
                    raise
        info = self._client.get_collection(name)
        if not created:
            self._check_config(name, info, dimension)
        self._ensure_payload_indexes(name, info)
        return created

    def collection_exists(self, name: str) -> bool:
        return bool(self._client.collection_exists(name))

    def delete_collection(self, name: str) -> bool:
        if not self._client.collection_exists(name):
            return False
        return bool(self._client.delete_collection(name))

    def upsert(self, name: str, points: Sequence[IndexPoint]) -> None:
        from qdrant_client import models

        for batch in _batches(points, UPSERT_BATCH_SIZE):
            # A column Batch skips building one pydantic PointStruct per point.
            self._client.upsert(
                name,
                points=models.Batch(
                    ids=[_canonical_id(p.id) for p in batch],
                    vectors=[_as_floats(p.vector) for p in batch],
                    payloads=[p.payload for p in batch],
                ),
                wait=True,
            )

    def delete(self, name: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids or not self._client.collection_exists(name):
            return
        for batch in _batches(ids, DELETE_BATCH_SIZE):
            self._client.delete(
                name,
                points_selector=models.PointIdsList(points=[_canonical_id(i) for i in batch]),
                wait=True,
            )

    def delete_shard(self, name: str, shard: int) -> None:
        from qdrant_client import models

        flt = self._shard_filter(shard)
        if not self._client.collection_exists(name):
            return
        self._client.delete(name, points_selector=models.FilterSelector(filter=flt), wait=True)

    def count(self, name: str, shard: int | None = None) -> int:
        flt = None if shard is None else self._shard_filter(shard)
        if not self._client.collection_exists(name):
            return 0
        return int(self._client.count(name, count_filter=flt, exact=True).count)

    def search(
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        shard: int | None = None,
        exact: bool = False,
        config: IndexConfig = IndexConfig(),
    ) -> list[IndexHit]:
        from qdrant_client import models

        if limit < 1 or not self._client.collection_exists(name):
            return []
        response = self._client.query_points(
            name,
            query=_as_floats(vector),
            query_filter=None if shard is None else self._shard_filter(shard),
            search_params=models.SearchParams(
                hnsw_ef=max(config.ef_search, limit),
                exact=exact,
                quantization=models.QuantizationSearchParams(rescore=True),
            ),
            limit=limit,
            with_payload=True,
            with_vectors=False,
        )
        return [
            IndexHit(_hit_id(p.id), float(p.score), dict(p.payload or {})) for p in response.points
        ]

    def retrieve(self, name: str, ids: Sequence[str], vectors: bool = False) -> list[IndexHit]:
        if not ids or not self._client.collection_exists(name):
            return []
        records = self._client.retrieve(
            name, ids=[_canonical_id(i) for i in ids], with_payload=True, with_vectors=vectors
        )
        return [
            IndexHit(_hit_id(r.id), 0.0, dict(r.payload or {}), _vector_of(r) if vectors else None)
            for r in records
        ]

    supports_aliases = True

    def alias_target(self, alias: str) -> str | None:
        for description in self._client.get_aliases().aliases:
            if description.alias_name == alias:
                return description.collection_name
        return None

    def point_alias(self, alias: str, collection: str) -> None:
        from qdrant_client import models

        actions: list[Any] = []
        if self.alias_target(alias) is not None:
            actions.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            )
        actions.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        # One request: Qdrant applies the alias changes of a request atomically.
        self._client.update_collection_aliases(change_aliases_operations=actions)

    @contextlib.contextmanager
    def keep_open(self) -> Iterator[None]:
        yield  # nothing to open: a server keeps its collections

    @contextlib.contextmanager
    def brief(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[None]:
        # The server serialises writers itself; nothing to hold.
        yield

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def _shard_filter(shard: int) -> qdrant_models.Filter:
        from qdrant_client import models

        key, value = _shard_filter_args(shard)
        return models.Filter(
            must=[models.FieldCondition(key=key, match=models.MatchValue(value=value))]
        )

    def _check_config(self, name: str, info: qdrant_models.CollectionInfo, dimension: int) -> None:
        from qdrant_client import models

        vectors = info.config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise _mismatch_error(name, "named vectors", dimension, "DELETE /collections/" + name)
        distance = vectors.distance
        if vectors.size != dimension or distance != models.Distance.COSINE:
            raise _mismatch_error(
                name,
                f"{vectors.size}-dimensional {distance.value} vectors",
                dimension,
                "DELETE /collections/" + name,
            )

    def _ensure_payload_indexes(self, name: str, info: qdrant_models.CollectionInfo) -> None:
        from qdrant_client import models

        # Checked on every ensure, so a crash right after create still ends up indexed.
        existing = set((info.payload_schema or {}).keys())
        for field, kind in PAYLOAD_INDEXES.items():
            if field in existing:
                continue
            try:
                with warnings.catch_warnings():
                    # Local mode warns that payload indexes do nothing there; that is expected.
                    warnings.simplefilter("ignore", UserWarning)
                    self._client.create_payload_index(
                        name, field_name=field, field_schema=models.PayloadSchemaType(kind)
                    )
            except Exception as exc:  # an index speeds filters up; it is not needed for them
                log.warning("could not create payload index %r on %r: %s", field, name, exc)
