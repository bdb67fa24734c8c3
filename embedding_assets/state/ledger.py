"""The ledger: per (target, source row) what is stored (content hash, pipeline version, chunk
count), written in the same transaction as the pgvector chunks. Pending work is always
derived by comparing source rows with it, never from a cursor alone, so a crash anywhere
converges. Destinations that are written later (Qdrant) track their own columns beside it.
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from embedding_assets.core.sharding import shard_sql
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.migrations import migrate

LOST_VERSION = "lost"  # a ledger version no pipeline has: the row is pending again


class ModelMismatchError(RuntimeError):
    """The target holds another model's vectors than the configured embedder's."""


def pipeline_version(model_id: str, max_tokens: int, overlap: int) -> str:
    """Everything that shapes a row's chunks and vectors; a change makes every row pending."""
    return f"{model_id}|max_tokens={max_tokens}|overlap={overlap}"


@dataclass(frozen=True)
class TargetRecord:
    model: str
    dimension: int
    shards: int
    vector_index: str


class Ledger:
    """The row-state ledger of one target (a source's pgvector table)."""

    def __init__(
        self, engine: sa.Engine, target: str, source: str, version: str, with_qdrant: bool = True
    ):
        self.engine = engine
        self.target = target
        self.source = source
        self.version = version
        # Without a Qdrant destination nothing is owed to it: a write leaves the row's Qdrant
        # state equal to its content (never lagging), and a delete leaves no tombstone.
        self.with_qdrant = with_qdrant
        migrate(engine)

    # -- the target ---------------------------------------------------------------------

    def record(self, conn: sa.Connection | None = None) -> TargetRecord | None:
        query = sa.text(
            "SELECT model, dimension, shards, vector_index "
            f"FROM {STATE_SCHEMA}.targets WHERE target = :t"
        )
        if conn is None:
            with self.engine.connect() as own:
                row = own.execute(query, {"t": self.target}).one_or_none()
        else:
            row = conn.execute(query, {"t": self.target}).one_or_none()
        return TargetRecord(*row) if row is not None else None

    def claim_target(
        self,
        conn: sa.Connection,
        model_id: str,
        dimension: int,
        shards: int,
        qdrant_collection: str,
        vector_index: str,
    ) -> TargetRecord | None:
        """Record the target for this model, or refuse one holding another model's vectors
        (that needs a new table, never a mix). Returns what was recorded before, if any."""
        recorded = self.record(conn)
        if recorded is not None and (recorded.model, recorded.dimension) != (model_id, dimension):
            raise ModelMismatchError(
                f"pgvector table {self.target} holds vectors of {recorded.model} "
                f"({recorded.dimension}-d) but source {self.source!r} now uses "
                f"{model_id} ({dimension}-d). One table holds one model: a model "
                "changed in sources.yaml is built as a new generation beside this one "
                "(`embedding-assets generations list`)."
            )
        conn.execute(
            sa.text(
                f"INSERT INTO {STATE_SCHEMA}.targets "
                "(target, source, model, dimension, shards, qdrant_collection, vector_index) "
                "VALUES (:t, :s, :m, :d, :n, :q, :vi) ON CONFLICT (target) DO NOTHING"
            ),
            {
                "t": self.target,
                "s": self.source,
                "m": model_id,
                "d": dimension,
                "n": shards,
                "q": qdrant_collection,
                "vi": vector_index,
            },
        )
        return recorded

    def set_vector_index(self, conn: sa.Connection, state: str) -> None:
        """The pgvector HNSW index: 'built', or 'deferred' during a bulk load. A new index
        needs its recall measured again."""
        conn.execute(
            sa.text(
                f"""UPDATE {STATE_SCHEMA}.targets SET vector_index = :v,
                    recall = NULL, recall_measured_at = NULL WHERE target = :t"""
            ),
            {"v": state, "t": self.target},
        )

    def recent_recall(self, max_age_seconds: float) -> tuple[dict, str] | None:
        """The last recall measurement and its time (text), if newer than `max_age_seconds`."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"""SELECT recall, CAST(recall_measured_at AS text) AS at
                    FROM {STATE_SCHEMA}.targets WHERE target = :t
                    AND recall_measured_at > now() - make_interval(secs => :age)"""
                ),
                {"t": self.target, "age": max_age_seconds},
            ).one_or_none()
        return (row.recall, row.at) if row is not None and row.recall is not None else None

    def set_recall(self, recall: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.targets SET recall = CAST(:r AS jsonb),
                        recall_measured_at = now() WHERE target = :t"""
                ),
                {"r": json.dumps(recall), "t": self.target},
            )

    def reshard(self, conn: sa.Connection, shards: int) -> None:
        """The shard count changed: recompute every ledger row's shard."""
        conn.execute(
            sa.text(
                f"UPDATE {STATE_SCHEMA}.row_state SET shard = {shard_sql('row_id', shards)} "
                "WHERE target = :t"
            ),
            {"t": self.target},
        )
        conn.execute(
            sa.text(f"UPDATE {STATE_SCHEMA}.targets SET shards = :n WHERE target = :t"),
            {"n": shards, "t": self.target},
        )

    # -- writes (inside the destination's transaction) ----------------------------------

    def newer_rows(self, conn: sa.Connection, ids: Sequence[str], read_at: datetime) -> set[str]:
        """Rows stored after `read_at` (by a newer run), locked until the transaction ends:
        the newer write wins and nothing regresses."""
        return set(
            conn.scalars(
                sa.text(
                    f"SELECT row_id FROM {STATE_SCHEMA}.row_state WHERE target = :t "
                    "AND row_id = ANY(:ids) AND pg_synced_at > :at FOR UPDATE"
                ),
                {"t": self.target, "ids": list(ids), "at": read_at},
            )
        )

    def record_written(
        self,
        conn: sa.Connection,
        shard: int,
        ids: Sequence[str],
        hashes: Sequence[str],
        chunk_counts: Sequence[int],
    ) -> None:
        if not ids:
            return
        # Without Qdrant, its state is set equal to the row's (nothing owed to it).
        qdrant_cols, qdrant_values, qdrant_set = (
            ("", "", "")
            if self.with_qdrant
            else (
                ", qdrant_hash, qdrant_chunk_count",
                ", u.hash, u.n",
                ", qdrant_hash = EXCLUDED.qdrant_hash"
                ", qdrant_chunk_count = EXCLUDED.qdrant_chunk_count",
            )
        )
        conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.row_state AS s
                    (target, row_id, shard, content_hash, version, chunk_count,
                     pg_synced_at, deleted{qdrant_cols})
                SELECT :t, u.row_id, :shard, u.hash, :v, u.n, clock_timestamp(), false
                    {qdrant_values}
                FROM unnest(CAST(:ids AS text[]), CAST(:hashes AS text[]),
                            CAST(:counts AS int[])) AS u(row_id, hash, n)
                ON CONFLICT (target, row_id) DO UPDATE SET
                    shard = EXCLUDED.shard, content_hash = EXCLUDED.content_hash,
                    version = EXCLUDED.version, chunk_count = EXCLUDED.chunk_count,
                    pg_synced_at = EXCLUDED.pg_synced_at, deleted = false{qdrant_set}"""
            ),
            {
                "t": self.target,
                "shard": shard,
                "v": self.version,
                "ids": list(ids),
                "hashes": list(hashes),
                "counts": [int(n) for n in chunk_counts],
            },
        )

    def record_deleted(self, conn: sa.Connection, ids: Sequence[str]) -> None:
        """Tombstones stay until Qdrant has dropped the row's points too."""
        if not ids:
            return
        conn.execute(
            sa.text(
                f"""UPDATE {STATE_SCHEMA}.row_state SET deleted = true,
                    content_hash = NULL, chunk_count = 0, pg_synced_at = clock_timestamp()"""
                + ("" if self.with_qdrant else ", qdrant_hash = NULL, qdrant_chunk_count = 0")
                + " WHERE target = :t AND row_id = ANY(:ids)"
            ),
            {"t": self.target, "ids": list(ids)},
        )
        conn.execute(
            sa.text(
                f"""DELETE FROM {STATE_SCHEMA}.row_state WHERE target = :t
                AND row_id = ANY(:ids) AND qdrant_hash IS NULL AND qdrant_chunk_count = 0"""
            ),
            {"t": self.target, "ids": list(ids)},
        )

    # -- reads --------------------------------------------------------------------------

    def holdings_by_shard(self, shard: int | None = None) -> dict[int, tuple[int, int, int]]:
        """Per shard (or of one, through the shard index), what the ledger records: rows
        current with this pipeline version, the chunks pgvector holds, and the points Qdrant
        was last recorded to hold. No destination is read."""
        only = "AND shard = :s" if shard is not None else ""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT shard,
                        count(*) FILTER (WHERE NOT deleted AND version = :v) AS current,
                        coalesce(sum(chunk_count), 0) AS chunks,
                        coalesce(sum(qdrant_chunk_count)
                            FILTER (WHERE qdrant_hash IS NOT DISTINCT FROM content_hash), 0)
                            AS points
                    FROM {STATE_SCHEMA}.row_state WHERE target = :t {only} GROUP BY shard"""
                ),
                {"t": self.target, "v": self.version, "s": shard},
            ).fetchall()
        return {r.shard: (r.current, int(r.chunks), int(r.points)) for r in rows}

    def current_rows_by_shard(self, shard: int | None = None) -> dict[int, int]:
        """Per shard, ledger rows stored with the current pipeline version."""
        only = "AND shard = :s" if shard is not None else ""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT shard, count(*) AS n FROM {STATE_SCHEMA}.row_state
                    WHERE target = :t AND NOT deleted AND version = :v {only} GROUP BY shard"""
                ),
                {"t": self.target, "v": self.version, "s": shard},
            ).fetchall()
        return {row.shard: row.n for row in rows}
