"""Qdrant's own engine embedded in the process (qdrant-edge): one folder per collection, and
one process holding a collection at a time.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import qdrant_edge as edge

from embedding_assets.core.fusion import candidates
from embedding_assets.destinations.qdrant_edge_files import (
    CONFIG_FILE,
    check_shard_config,
    create_shard,
)
from embedding_assets.destinations.qdrant_lexical import LEXICAL_VECTOR
from embedding_assets.destinations.qdrant_store import (
    DEFAULT_INDEX_CONFIG,
    DELETE_BATCH_SIZE,
    UPSERT_BATCH_SIZE,
    IndexConfig,
    IndexHit,
    IndexPoint,
    as_floats,
    batches,
    canonical_id,
    fused_hits,
    hit_id,
    shard_filter_args,
    vector_of,
)

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")


class EmbeddedStoreHeld(RuntimeError):
    """A collection's WAL is locked by a process that does not take our flock."""


@dataclass
class _Handle:
    """One collection while this thread holds its lock; the shard is opened on first use."""

    path: Path
    shard: edge.EdgeShard | None = None
    dirty: bool = False  # written to since opened: flush before closing

    @property
    def exists(self) -> bool:
        return (self.path / CONFIG_FILE).is_file()

    def load(self) -> edge.EdgeShard | None:
        """The open shard, or None if the collection does not exist."""
        if self.shard is None and self.exists:
            try:
                self.shard = edge.EdgeShard.load(str(self.path))
            except Exception as exc:  # qdrant-edge raises plain Exception
                if "WouldBlock" not in str(exc):
                    raise
                # Our own flock is held, so the WAL lock is someone else's.
                raise EmbeddedStoreHeld(
                    f"the embedded Qdrant collection {self.path} is open in a process that "
                    "is not embedding-assets (a qdrant-edge reader?), which blocks our writes "
                    "and searches until it closes it. Only embedding-assets may open the "
                    "embedded engine; applications that read Qdrant need a Qdrant server "
                    "(QDRANT_URL). The shard's run fails and is retried."
                ) from None
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

    def update_index_config(self, name: str, config: IndexConfig) -> bool:
        return False  # searched exactly: no index to rebuild

    def ensure_collection(
        self,
        name: str,
        dimension: int,
        config: IndexConfig = DEFAULT_INDEX_CONFIG,
        lexical: bool = False,
    ) -> bool:
        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        with self._open(name) as handle:
            if handle.exists:  # the config file answers this; no need to open the shard
                check_shard_config(name, handle.path, dimension)
                return False
            create_shard(handle.path, dimension, lexical)
            log.info("created embedded Qdrant collection %r (%d-d, cosine)", name, dimension)
            return True

    def collection_exists(self, name: str) -> bool:
        return (self._path(name) / CONFIG_FILE).is_file()

    def has_lexical(self, name: str) -> bool:
        try:
            stored = json.loads((self._path(name) / CONFIG_FILE).read_text())
        except (OSError, ValueError):
            return False
        return LEXICAL_VECTOR in (stored.get("sparse_vectors") or {})

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
            for batch in batches(points, UPSERT_BATCH_SIZE):
                shard.update(
                    edge.UpdateOperation.upsert_points(
                        [edge.Point(canonical_id(p.id), _vectors(p), p.payload) for p in batch]
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
            for batch in batches(ids, DELETE_BATCH_SIZE):
                shard.update(edge.UpdateOperation.delete_points([canonical_id(i) for i in batch]))

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
        config: IndexConfig = DEFAULT_INDEX_CONFIG,
        mode: str = "dense",
        terms: tuple[list[int], list[float]] | None = None,
        lexical_weight: float = 1.0,
    ) -> list[IndexHit]:
        # The engine never builds an HNSW graph (see above): every search is exact.
        if limit < 1:
            return []
        only = None if shard is None else self._shard_filter(shard)
        queries = []
        if mode != "lexical":
            queries.append(edge.Query.Nearest(as_floats(vector)))
        if mode != "dense" and terms is not None:
            queries.append(edge.Query.Nearest(edge.SparseVector(*terms), using=LEXICAL_VECTOR))
        n = candidates(limit) if mode == "hybrid" else limit
        requests = [
            edge.QueryRequest(
                limit=n, query=query, filter=only, with_payload=True, with_vector=False
            )
            for query in queries
        ]
        with self._open(name) as handle:
            edge_shard = handle.load()
            if edge_shard is None:
                return []
            results = [
                [IndexHit(hit_id(p.id), float(p.score), dict(p.payload or {})) for p in scored]
                for scored in map(edge_shard.query, requests)
            ]
        return fused_hits(results, lexical_weight, limit) if mode == "hybrid" else results[0]

    def retrieve(self, name: str, ids: Sequence[str], vectors: bool = False) -> list[IndexHit]:
        if not ids:
            return []
        with self._open(name) as handle:
            shard = handle.load()
            if shard is None:
                return []
            records = shard.retrieve([canonical_id(i) for i in ids], True, vectors)
        return [
            IndexHit(hit_id(r.id), 0.0, dict(r.payload or {}), vector_of(r) if vectors else None)
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
        kept: dict[str, contextlib.ExitStack] = {}
        self._local.keeping = kept
        try:
            yield
        finally:
            self._local.keeping = None
            with contextlib.ExitStack() as closing:  # every one closes, even if one fails
                for stack in reversed(list(kept.values())):
                    closing.push(stack.__exit__)
                kept.clear()

    def yield_to_waiters(self) -> list[str]:
        kept = getattr(self._local, "keeping", None) or {}
        released = []
        for name in list(kept):
            if name not in self._handles() or not self._waited_for(name):
                continue
            kept.pop(name).close()  # flush, close, unlock: the waiter takes it now
            released.append(name)
        return released

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
            stack = contextlib.ExitStack()
            handle = stack.enter_context(self._held(name))
            keeping[name] = stack
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
        if lock_path.parent == self.root and self.root.stat().st_mode & 0o077:
            # Points hold chunk text that grants or row-level security hide in Postgres.
            self.root.chmod(0o700)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        waiting: int | None = None  # our shared lock on the waiters' file, while we wait
        try:
            deadline = time.monotonic() + self.lock_timeout_s
            delay = 0.005
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if waiting is None:  # tell a holder that keeps it open (yield_to_waiters)
                        waiting = os.open(_waiters_file(lock_path), os.O_RDWR | os.O_CREAT, 0o600)
                        fcntl.flock(waiting, fcntl.LOCK_SH)
                    # Poll rather than block so a stuck holder gives a clear error, not a hang.
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"another process has held {lock_path} for over "
                            f"{self.lock_timeout_s:.0f} s (only one process may open an "
                            f"embedded Qdrant collection at a time)"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
            if waiting is not None:
                os.close(waiting)
                waiting = None
            yield
        finally:
            if waiting is not None:
                os.close(waiting)
            os.close(fd)  # closing the descriptor releases the flock

    def _waited_for(self, name: str) -> bool:
        """Whether another thread or process waits for the collection's lock (holds a
        shared lock on its waiters' file)."""
        path = self._path(name)
        waiters = _waiters_file(path.with_name(f".{path.name}.lock"))
        if not waiters.exists():
            return False
        fd = os.open(waiters, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _handles(self) -> dict[str, _Handle]:
        handles: dict[str, _Handle] | None = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        return handles

    @staticmethod
    def _shard_filter(shard: int) -> edge.Filter:
        key, value = shard_filter_args(shard)
        return edge.Filter(must=[edge.FieldCondition(key=key, match=edge.MatchValue(value))])

    # -- shard files --

    def _path(self, name: str) -> Path:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"invalid collection name {name!r}: use letters, digits, '_', '-' or '.', "
                "starting with a letter or digit (it names a directory)"
            )
        return self.root / name


def _waiters_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".waiting")


def _vectors(point: IndexPoint):
    """The dense vector alone, or with the sparse one (a collection with `lexical`)."""
    if point.sparse is None:
        return as_floats(point.vector)
    return {"": as_floats(point.vector), LEXICAL_VECTOR: edge.SparseVector(*point.sparse)}
