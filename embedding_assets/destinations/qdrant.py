"""The Qdrant destination (a server, or Qdrant's engine embedded): the target's chunks as
points, reconciled from the ledger and the pgvector chunks, never from a run's output.

It tracks its own synced state in the ledger's `qdrant_hash` / `qdrant_chunk_count`
columns: a row lags when they differ from what pgvector holds. A partial index on exactly
that condition makes finding lagging rows cost O(lagging rows).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import IndexUpdate
from embedding_assets.core.ids import point_id
from embedding_assets.destinations.base import Repair
from embedding_assets.destinations.pgvector import PgVectorDestination
from embedding_assets.destinations.qdrant_embedded import EmbeddedQdrantStore
from embedding_assets.destinations.qdrant_lexical import document_terms, query_terms
from embedding_assets.destinations.qdrant_store import (
    IndexConfig,
    IndexHit,
    IndexPoint,
    QdrantStore,
)
from embedding_assets.state.db import use_partial_index
from embedding_assets.state.ddl import STATE_SCHEMA

LAGGING = "(qdrant_hash IS DISTINCT FROM content_hash OR qdrant_chunk_count <> chunk_count)"


@dataclass(frozen=True)
class PlanStats:
    lag_rows: int
    reconciled: bool
    created_collection: bool


def payload_metadata(payload: dict) -> dict:
    """A point's `metadata` as the readers' view has it: the nested object, or for a point
    written before it existed, the flat keys without the payload's own."""
    nested = payload.get("metadata")
    if isinstance(nested, dict):
        return nested
    return {k: v for k, v in payload.items() if k not in ("shard", "text")}


class QdrantDestination:
    """Qdrant, a `FollowingDestination`: planned from the ledger and the chunk table after each
    write, over whichever engine `store` is (a server, or the embedded engine)."""

    name = "qdrant"

    def __init__(
        self,
        engine: sa.Engine,
        spec: SourceSpec,
        target: str,
        store: QdrantStore,
        pgvector: PgVectorDestination,
    ):
        self.engine = engine
        self.spec = spec
        self.target = target
        self.store = store
        self.pgvector = pgvector
        self.collection = spec.qdrant_collection

    @property
    def store_is_embedded(self) -> bool:
        return isinstance(self.store, EmbeddedQdrantStore)

    # -- what Qdrant lags on ------------------------------------------------------------

    def lag_by_shard(self) -> dict[int, tuple[int, str]]:
        """Per shard with lagging rows: (rows, fingerprint). Reads the partial index only."""
        with self.engine.connect() as conn:
            use_partial_index(conn)
            rows = conn.execute(
                sa.text(
                    f"""SELECT shard, count(*) AS n,
                        md5(string_agg(concat_ws(':', row_id, content_hash,
                            CAST(pg_synced_at AS text)), ',' ORDER BY row_id)) AS digest
                    FROM {STATE_SCHEMA}.row_state WHERE target = :t AND {LAGGING}
                    GROUP BY shard"""
                ),
                {"t": self.target},
            ).fetchall()
        return {r.shard: (r.n, r.digest) for r in rows}

    def expected_points(self, shard: int) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.scalar(
                    sa.text(
                        f"SELECT coalesce(sum(qdrant_chunk_count), 0) FROM {STATE_SCHEMA}.row_state"
                        " WHERE target = :t AND shard = :shard"
                    ),
                    {"t": self.target, "shard": shard},
                )
            )

    def forget(self, shard: int | None = None) -> None:
        """Qdrant lost its points (new collection, or counts disagree): mark every row of
        the shard (or all shards) as absent from Qdrant so the next sync resends it."""
        shard_filter = "AND shard = :shard" if shard is not None else ""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.row_state SET qdrant_hash = NULL,
                        qdrant_chunk_count = 0 WHERE target = :t {shard_filter}"""
                ),
                {"t": self.target, "shard": shard},
            )
            conn.execute(
                sa.text(
                    f"DELETE FROM {STATE_SCHEMA}.row_state WHERE target = :t AND deleted "
                    f"{shard_filter}"
                ),
                {"t": self.target, "shard": shard},
            )

    # -- plan and apply -----------------------------------------------------------------

    def plan(
        self, shard: int, dimension: int, limit: int, model_id: str
    ) -> tuple[IndexUpdate, PlanStats]:
        """What Qdrant must change so the shard's points equal pgvector's chunks. Reads only.

        If the collection is missing, or Qdrant's point count for the shard disagrees with
        what the ledger says it holds (store wiped, points removed by hand, a crash
        mid-upsert), the plan drops the shard's points and resends every row.
        """
        with self.store.session(self.collection):
            exists = self.store.collection_exists(self.collection)
            reset = not exists or (
                self.store.count(self.collection, shard=shard) != self.expected_points(shard)
            )
            # A collection made without the sparse vector keeps dense points only (a new
            # generation brings it); a new one gets it as `hybrid:` says.
            lexical = self.store.has_lexical(self.collection) if exists else self.lexical
        lag, chunks = self._lagging(shard, limit, every_row=reset)
        update = IndexUpdate(
            shard=shard,
            backlog=len(lag) >= limit,
            collection=self.collection,
            dimension=dimension,
            create_collection=not exists,
            reset_shard=reset,
        )
        # A row whose chunks pgvector lacks (lost, restore pending) is neither sent nor
        # marked synced: Qdrant keeps what it holds until pgvector has the row again.
        fetched = chunks.groupby("row_id").size().to_dict() if len(chunks) else {}
        incomplete = {
            row.row_id
            for row in lag.itertuples(index=False)
            if not row.deleted and fetched.get(row.row_id, 0) < int(row.chunk_count)
        }
        if incomplete:
            lag = lag[~lag["row_id"].isin(incomplete)]
            chunks = chunks[~chunks["row_id"].isin(incomplete)]
        for pid, row_id, chunk_index, text, vector, metadata in zip(
            chunks["point_id"],
            chunks["row_id"],
            chunks["chunk_index"].tolist(),
            chunks["chunk_text"],
            chunks["embedding"],
            chunks["metadata"],
            strict=True,
        ):
            # Metadata first: the payload's own keys win (settings refuse such names anyway).
            # Flat for filters and llama-index, and nested as `metadata` (what the readers'
            # view has) for clients that read one object, as langchain-qdrant does.
            readable = {"row_id": row_id, "chunk_index": int(chunk_index), **metadata}
            payload = {**readable, "shard": shard, "text": text, "metadata": readable}
            terms = document_terms(text, self.spec.hybrid.language) if lexical else None
            update.upserts.append(IndexPoint(id=pid, vector=vector, payload=payload, sparse=terms))
        for row in lag.itertuples(index=False):
            if not reset:
                # Points past the row's new chunk count are stale (all, for a deleted row).
                update.deletes.extend(
                    point_id(self.spec.name, row.row_id, index, model_id)
                    for index in range(int(row.chunk_count), int(row.qdrant_chunk_count))
                )
            update.synced.append((row.row_id, row.content_hash, int(row.chunk_count)))
        return update, PlanStats(len(lag), reset and exists, not exists)

    def _lagging(
        self, shard: int, limit: int, every_row: bool
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        condition = "true" if every_row else LAGGING
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            if not every_row:
                use_partial_index(conn)
            lag = pd.DataFrame(
                conn.execute(
                    sa.text(
                        f"""SELECT row_id, content_hash, chunk_count, qdrant_chunk_count, deleted
                        FROM {STATE_SCHEMA}.row_state WHERE target = :t AND shard = :shard
                        AND {condition} ORDER BY row_id LIMIT :limit"""
                    ),
                    {"t": self.target, "shard": shard, "limit": limit},
                ).fetchall(),
                columns=["row_id", "content_hash", "chunk_count", "qdrant_chunk_count", "deleted"],
                dtype=object,  # a deleted row's NULL hash must stay None, not NaN
            )
            live = lag.loc[~lag["deleted"].astype(bool), "row_id"].tolist()
            chunks = self.pgvector.chunks_of_rows(conn, live)
        return lag, chunks

    def apply(self, update: IndexUpdate) -> None:
        with self.store.session(self.collection):
            if update.create_collection or update.reset_shard:
                if self.store.ensure_collection(
                    self.collection, update.dimension, self.index_config, lexical=self.lexical
                ):
                    self.forget()  # a new collection holds nothing of any shard
                if update.reset_shard:
                    self.store.delete_shard(self.collection, update.shard)
                    self.forget(update.shard)
            if update.deletes:
                self.store.delete(self.collection, update.deletes)
            if update.upserts:
                self.store.upsert(self.collection, update.upserts)
        # Recorded only after Qdrant has the points: a crash before this line resends them.
        self.mark_synced(update.synced)

    def mark_synced(self, synced: Sequence[tuple[str, str | None, int]]) -> None:
        """Record what Qdrant now holds. A row rewritten meanwhile keeps its lag (its hash
        differs) and its point count stays an upper bound, so no stale point is forgotten."""
        if not synced:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.row_state AS s SET
                        qdrant_hash = CASE WHEN s.content_hash IS NOT DISTINCT FROM u.hash
                                      THEN u.hash ELSE s.qdrant_hash END,
                        qdrant_chunk_count = CASE WHEN s.content_hash IS NOT DISTINCT FROM u.hash
                                      THEN u.n ELSE greatest(s.qdrant_chunk_count, u.n) END
                    FROM unnest(CAST(:ids AS text[]), CAST(:hashes AS text[]),
                                CAST(:counts AS int[])) AS u(row_id, hash, n)
                    WHERE s.target = :t AND s.row_id = u.row_id"""
                ),
                {
                    "t": self.target,
                    "ids": [s[0] for s in synced],
                    "hashes": [s[1] for s in synced],
                    "counts": [s[2] for s in synced],
                },
            )
            conn.execute(
                sa.text(
                    f"""DELETE FROM {STATE_SCHEMA}.row_state WHERE target = :t AND deleted
                    AND row_id = ANY(:ids) AND qdrant_chunk_count = 0 AND qdrant_hash IS NULL"""
                ),
                {"t": self.target, "ids": [s[0] for s in synced]},
            )

    # -- reads --------------------------------------------------------------------------

    def restorable_vectors(self, chunks: pd.DataFrame, model_id: str) -> dict[str, np.ndarray]:
        """{chunk hash: vector} for chunks whose point Qdrant holds with the same text: what
        pgvector lost is restored from here instead of being embedded again."""
        if not len(chunks) or not self.store.collection_exists(self.collection):
            return {}
        ids = [
            point_id(self.spec.name, row_id, int(index), model_id)
            for row_id, index in zip(chunks["row_id"], chunks["chunk_index"], strict=True)
        ]
        # Called from the embeddings step, outside the store's pool: holding an embedded
        # store until the run ends while waiting for that pool would deadlock with the run
        # that holds the pool and waits for the store.
        with self.store.brief():
            hits = {h.id: h for h in self.store.retrieve(self.collection, ids, vectors=True)}
        found = {}
        for pid, text, chunk_hash in zip(ids, chunks["text"], chunks["chunk_hash"], strict=True):
            hit = hits.get(pid)
            if hit is not None and hit.vector is not None and hit.payload.get("text") == text:
                found[chunk_hash] = hit.vector
        return found

    def count(self, shard: int | None = None) -> int:
        return self.store.count(self.collection, shard=shard)

    def repair(self, shard: int | None, enqueue: bool) -> Repair:
        """Qdrant's count disagrees with the ledger: the shard (or all) is resent from the
        chunk table by the next run; nothing to queue, the ledger's lag is the work."""
        self.forget(shard)
        return Repair(resent=True)

    @property
    def index_config(self) -> IndexConfig:
        qdrant = self.spec.qdrant
        return IndexConfig(
            m=qdrant.hnsw.m,
            ef_construct=qdrant.hnsw.ef_construct,
            ef_search=qdrant.hnsw.ef_search,
            quantization=qdrant.quantization,
        )

    @property
    def lexical(self) -> bool:
        """Whether a collection this destination makes gets the sparse `lexical` vector."""
        return self.spec.hybrid.enabled

    def has_lexical(self) -> bool:
        return self.store.has_lexical(self.collection)

    def search(
        self,
        vector: Sequence[float] | None,
        limit: int,
        shard: int | None = None,
        exact: bool = False,
        mode: str = "dense",
        text: str | None = None,
    ) -> list[IndexHit]:
        """Nearest points in `mode` (dense, lexical, hybrid: see `QdrantStore.search`)."""
        if mode != "dense" and not self.has_lexical():
            raise LookupError(
                f"{mode} search needs the sparse `lexical` vector, which Qdrant collection "
                f"{self.collection!r} lacks (made before hybrid search, or hybrid: false): "
                "search in dense mode; a new generation (a change of model, template or "
                "chunking) is made with it"
            )
        terms = query_terms(text or "", self.spec.hybrid.language) if mode != "dense" else None
        return self.store.search(
            self.collection,
            vector,
            limit,
            shard,
            exact=exact,
            config=self.index_config,
            mode=mode,
            terms=terms,
            lexical_weight=self.spec.hybrid.lexical_weight,
        )

    def retrieve(self, ids: Sequence[str]) -> list[IndexHit]:
        return self.store.retrieve(self.collection, ids)
