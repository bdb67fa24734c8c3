"""The pgvector side of a source: the chunk table, the durable per-row state, and the diff.

Tables (all in the data database):
- `embedding_assets.targets`: one row per pgvector table: source, model, dimension, shards.
- `embedding_assets.row_state`: one row per (target, source row): the content hash and
  pipeline version pgvector holds, and what Qdrant holds. Pending work is always derived by
  comparing the source with this table, never from a cursor, so a crash anywhere converges.
- the target table (e.g. `public.pypi_packages_embeddings`): one row per chunk with its
  vector and the configured metadata columns.

A target holds vectors of one model only; a different model needs a new table (blue/green).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from embedding_assets.core.delta import EmbeddedRows, PendingRows
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_sql
from embedding_assets.settings import SourceSpec
from embedding_assets.stores.source import (
    SourceSql,
    meta_alias,
    quote_ident,
    quote_table,
)

STATE_SCHEMA = "embedding_assets"
DDL_LOCK = "embedding_assets.ddl"

STATE_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA};
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.targets (
    target text PRIMARY KEY,
    source text NOT NULL,
    model text NOT NULL,
    dimension int NOT NULL,
    shards int NOT NULL,
    qdrant_collection text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.row_state (
    target text NOT NULL,
    row_id text NOT NULL,
    shard int NOT NULL,
    content_hash text,             -- what pgvector holds; NULL once the row is deleted
    version text NOT NULL,         -- model and chunking that produced the chunks
    chunk_count int NOT NULL,
    pg_synced_at timestamptz NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    qdrant_hash text,              -- content_hash of the points Qdrant holds
    qdrant_chunk_count int NOT NULL DEFAULT 0,  -- upper bound of the row's points in Qdrant
    PRIMARY KEY (target, row_id)
);
CREATE INDEX IF NOT EXISTS row_state_target_shard ON {STATE_SCHEMA}.row_state (target, shard);
"""


class ModelMismatchError(RuntimeError):
    """The pgvector table holds another model's vectors than the configured embedder's."""


@dataclass(frozen=True)
class ShardWork:
    shard: int
    eligible_rows: int
    embedded_rows: int
    pending_rows: int
    qdrant_lag_rows: int
    fingerprint: str | None  # changes whenever the shard's outstanding work changes

    @property
    def has_work(self) -> bool:
        return self.pending_rows > 0 or self.qdrant_lag_rows > 0


@dataclass(frozen=True)
class WriteStats:
    rows_written: int
    chunks_written: int
    rows_deleted: int
    rows_skipped_stale: int


@dataclass(frozen=True)
class SearchHit:
    row_id: str
    chunk_index: int
    score: float
    text: str
    point_id: str


def pipeline_version(model_id: str, max_tokens: int, overlap: int) -> str:
    """Everything that shapes a row's chunks and vectors; a change makes every row pending."""
    return f"{model_id}|max_tokens={max_tokens}|overlap={overlap}"


_DDL_DONE: set[tuple[str, str]] = set()  # (database URL, DDL) already applied by this process


def ensure_tables(engine: sa.Engine, ddl: str) -> None:
    """Apply idempotent DDL once per database and process, serialised across processes."""
    key = (engine.url.render_as_string(hide_password=False), ddl)
    if key in _DDL_DONE:
        return
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": DDL_LOCK})
        conn.exec_driver_sql(ddl)
    _DDL_DONE.add(key)


def json_safe(value: Any) -> Any:
    """A metadata value as JSON (Qdrant payload): numbers and strings kept, others as text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if np.isnan(value) else value
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, dict | list):
        return json.loads(json.dumps(value, default=str))
    return str(value)


class PgVectorStore:
    """All pgvector reads and writes of one source. Plain class: assets, checks, the sensor
    and the CLI share it."""

    def __init__(self, engine: sa.Engine, spec: SourceSpec, model_id: str, version: str):
        self.engine = engine
        self.spec = spec
        self.model_id = model_id
        self.version = version
        self.sql = SourceSql(spec)
        self.table = quote_table(spec.pg_table)
        self.target = spec.target
        ensure_tables(engine, STATE_DDL)

    # -- schema -------------------------------------------------------------------------

    def table_exists(self) -> bool:
        with self.engine.connect() as conn:
            return bool(
                conn.scalar(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": self.table})
            )

    def recorded_dimension(self) -> int | None:
        with self.engine.connect() as conn:
            return conn.scalar(
                sa.text(f"SELECT dimension FROM {STATE_SCHEMA}.targets WHERE target = :t"),
                {"t": self.target},
            )

    def _metadata_types(self, conn: sa.Connection) -> list[str]:
        if not self.spec.metadata:
            return []
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.execute(self.sql.metadata_probe().replace(r"\:", ":"))
            oids = [col.type_code for col in cursor.description]
        finally:
            cursor.close()
        return [
            conn.scalar(sa.text("SELECT format_type(:oid, NULL)"), {"oid": oid}) for oid in oids
        ]

    def ensure_target(self, dimension: int, qdrant_collection: str) -> None:
        """Create the chunk table for `dimension` and record the target, or refuse a target
        that holds another model's vectors (that needs a new table, never a mix)."""
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": DDL_LOCK})
            recorded = conn.execute(
                sa.text(
                    f"SELECT model, dimension, shards FROM {STATE_SCHEMA}.targets WHERE target = :t"
                ),
                {"t": self.target},
            ).one_or_none()
            if recorded is not None and (recorded.model, recorded.dimension) != (
                self.model_id,
                dimension,
            ):
                raise ModelMismatchError(
                    f"pgvector table {self.target} holds vectors of {recorded.model} "
                    f"({recorded.dimension}-d) but source {self.spec.name!r} now uses "
                    f"{self.model_id} ({dimension}-d). One table holds one model: set a new "
                    f"`pgvector: {{table: ...}}` and `qdrant: {{collection: ...}}` for the new "
                    "model (the old table stays readable), or drop the old table first."
                )
            schema, _ = self.spec.pg_table
            conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"))
            meta_cols = "".join(
                f", {quote_ident(name)} {pg_type}"
                for name, pg_type in zip(
                    self.spec.metadata, self._metadata_types(conn), strict=True
                )
            )
            conn.execute(
                sa.text(
                    f"""CREATE TABLE IF NOT EXISTS {self.table} (
                        point_id uuid PRIMARY KEY,
                        row_id text NOT NULL,
                        chunk_index int NOT NULL,
                        shard int NOT NULL,
                        chunk_text text NOT NULL,
                        chunk_hash text NOT NULL,
                        token_count int NOT NULL,
                        model text NOT NULL,
                        embedding vector({int(dimension)}) NOT NULL{meta_cols},
                        updated_at timestamptz NOT NULL DEFAULT now(),
                        UNIQUE (row_id, chunk_index))"""
                )
            )
            name = self.spec.pg_table[1]
            conn.execute(
                sa.text(
                    f"CREATE INDEX IF NOT EXISTS {quote_ident(name + '_chunk_hash')} "
                    f"ON {self.table} (chunk_hash)"
                )
            )
            conn.execute(
                sa.text(
                    f"CREATE INDEX IF NOT EXISTS {quote_ident(name + '_shard')} "
                    f"ON {self.table} (shard)"
                )
            )
            conn.execute(
                sa.text(
                    f"CREATE INDEX IF NOT EXISTS {quote_ident(name + '_embedding_hnsw')} "
                    f"ON {self.table} USING hnsw (embedding vector_cosine_ops)"
                )
            )
            conn.execute(
                sa.text(
                    f"INSERT INTO {STATE_SCHEMA}.targets "
                    "(target, source, model, dimension, shards, qdrant_collection) "
                    "VALUES (:t, :s, :m, :d, :n, :q) ON CONFLICT (target) DO NOTHING"
                ),
                {
                    "t": self.target,
                    "s": self.spec.name,
                    "m": self.model_id,
                    "d": dimension,
                    "n": self.spec.shards,
                    "q": qdrant_collection,
                },
            )
            if recorded is not None and recorded.shards != self.spec.shards:
                self._reshard(conn)

    def _reshard(self, conn: sa.Connection) -> None:
        """The shard count changed: recompute every stored row's shard, so each row is still
        owned by exactly one partition."""
        shard = shard_sql("row_id", self.spec.shards)
        conn.execute(
            sa.text(f"UPDATE {STATE_SCHEMA}.row_state SET shard = {shard} WHERE target = :t"),
            {"t": self.target},
        )
        conn.execute(sa.text(f"UPDATE {self.table} SET shard = {shard}"))
        conn.execute(
            sa.text(f"UPDATE {STATE_SCHEMA}.targets SET shards = :n WHERE target = :t"),
            {"n": self.spec.shards, "t": self.target},
        )

    # -- the diff -----------------------------------------------------------------------

    def _joined(self, shard: int | None) -> str:
        """Source rows FULL JOIN stored state, with the flags every count is made of."""
        shard_state = "AND shard = :shard" if shard is not None else ""
        return f"""
            WITH src AS ({self.sql.rows(shard)}),
            st AS (SELECT * FROM {STATE_SCHEMA}.row_state WHERE target = :target {shard_state})
            SELECT coalesce(src.row_id, st.row_id) AS row_id,
                   coalesce(src.shard, st.shard) AS shard,
                   src.row_id IS NOT NULL AS eligible,
                   (src.row_id IS NOT NULL AND st.row_id IS NOT NULL AND NOT st.deleted
                    AND st.content_hash = src.content_hash AND st.version = :version) AS current,
                   ((src.row_id IS NULL AND NOT st.deleted)
                    OR (src.row_id IS NOT NULL AND (st.row_id IS NULL OR st.deleted
                        OR st.content_hash IS DISTINCT FROM src.content_hash
                        OR st.version <> :version))) AS pending,
                   (st.row_id IS NOT NULL AND (st.qdrant_hash IS DISTINCT FROM st.content_hash
                    OR st.qdrant_chunk_count <> st.chunk_count)) AS qdrant_lag,
                   src.row_id IS NULL AS is_delete,
                   src.doc, src.is_empty, src.content_hash,
                   st.content_hash AS stored_hash, st.pg_synced_at
                   {"".join(f", src.{meta_alias(i)}" for i in range(len(self.spec.metadata)))}
            FROM src FULL OUTER JOIN st ON st.row_id = src.row_id"""

    def _params(self, **extra: Any) -> dict[str, Any]:
        return {"target": self.target, "version": self.version, **extra}

    def pending(self, shard: int, limit: int | None = None) -> PendingRows:
        """The shard's rows to (re)embed and row ids to remove, oldest ids first."""
        limit = limit or self.spec.max_rows_per_run
        query = f"""
            SELECT j.*, now() AS computed_at FROM ({self._joined(shard)}) AS j
            WHERE j.pending ORDER BY j.row_id LIMIT :limit"""
        with self.engine.connect() as conn:
            result = conn.execute(sa.text(query), self._params(shard=shard, limit=limit + 1))
            # object dtype keeps metadata values as the driver returned them (an integer
            # column with NULLs must not turn into floats).
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object)
            computed_at: datetime = conn.scalar(sa.text("SELECT now()"))
        backlog = len(frame) > limit
        frame = frame.iloc[:limit]
        if len(frame) and not frame["computed_at"].isna().all():
            computed_at = frame["computed_at"].iloc[0]
        duplicated = frame["row_id"][frame["row_id"].duplicated()].tolist()
        if duplicated:
            raise ValueError(
                f"source {self.spec.name!r} returns several rows for id(s) {duplicated[:5]}: "
                f"`{self.spec.id_column}` must identify one row; fix the query or id_column"
            )
        is_delete = frame["is_delete"].astype(bool)
        upserts = frame[~is_delete].rename(
            columns={meta_alias(i): c for i, c in enumerate(self.spec.metadata)}
        )
        keep = ["row_id", "doc", "is_empty", "content_hash", *self.spec.metadata]
        return PendingRows(
            source=self.spec.name,
            shard=shard,
            version=self.version,
            computed_at=computed_at,
            rows=upserts[keep].reset_index(drop=True),
            deleted=frame.loc[is_delete, "row_id"].tolist(),
            backlog=backlog,
        )

    def work_by_shard(self, shard: int | None = None) -> dict[int, ShardWork]:
        """Per shard (or for one shard only): eligible, current, pending and Qdrant-lagging
        rows, and a fingerprint of the outstanding work (row ids, source and stored hashes,
        last write time)."""
        query = f"""
            SELECT shard,
                   count(*) FILTER (WHERE eligible) AS eligible_rows,
                   count(*) FILTER (WHERE current) AS embedded_rows,
                   count(*) FILTER (WHERE pending) AS pending_rows,
                   count(*) FILTER (WHERE qdrant_lag) AS qdrant_lag_rows,
                   md5(string_agg(concat_ws(':', row_id, content_hash, stored_hash,
                                            CAST(pg_synced_at AS text)),
                       ',' ORDER BY row_id) FILTER (WHERE pending OR qdrant_lag)) AS fingerprint
            FROM ({self._joined(shard)}) AS j GROUP BY shard"""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query), self._params(shard=shard)).fetchall()
        shards = range(self.spec.shards) if shard is None else [shard]
        work = {i: ShardWork(i, 0, 0, 0, 0, None) for i in shards}
        for row in rows:
            work[row.shard] = ShardWork(
                row.shard,
                row.eligible_rows,
                row.embedded_rows,
                row.pending_rows,
                row.qdrant_lag_rows,
                row.fingerprint,
            )
        return work

    # -- embeddings: reuse and write ----------------------------------------------------

    def reusable_vectors(self, chunk_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors for these chunk hashes (this table holds one model only)."""
        if not chunk_hashes or not self.table_exists():
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"SELECT DISTINCT ON (chunk_hash) chunk_hash, embedding FROM {self.table} "
                    "WHERE chunk_hash = ANY(:hashes)"
                ),
                {"hashes": list(set(chunk_hashes))},
            ).fetchall()
        return {row.chunk_hash: as_array(row.embedding) for row in rows}

    def write(self, batch: EmbeddedRows) -> WriteStats:
        """Replace the chunks of every processed row and remove deleted rows, in one
        transaction with the row state. A row stored after this batch's delta was read
        (by a newer run) is skipped: the newer write wins and nothing regresses."""
        pending = batch.pending
        chunks = batch.chunked.chunks
        upsert_ids = pending.rows["row_id"].tolist()
        all_ids = upsert_ids + pending.deleted
        if not all_ids:
            return WriteStats(0, 0, 0, 0)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text("SELECT pg_advisory_xact_lock(hashtext(:t), :s)"),
                {"t": self.target, "s": pending.shard},
            )
            stale = set(
                conn.scalars(
                    sa.text(
                        f"SELECT row_id FROM {STATE_SCHEMA}.row_state WHERE target = :t "
                        "AND row_id = ANY(:ids) AND pg_synced_at > :at FOR UPDATE"
                    ),
                    {"t": self.target, "ids": all_ids, "at": pending.computed_at},
                )
            )
            apply_ids = [r for r in all_ids if r not in stale]
            conn.execute(
                sa.text(f"DELETE FROM {self.table} WHERE row_id = ANY(:ids)"), {"ids": apply_ids}
            )
            hashes = dict(zip(pending.rows["row_id"], pending.rows["content_hash"], strict=True))
            metadata = {
                values[0]: values[1:]
                for values in pending.rows[["row_id", *self.spec.metadata]].itertuples(
                    index=False, name=None
                )
            }
            columns = [
                "point_id", "row_id", "chunk_index", "shard", "chunk_text", "chunk_hash",
                "token_count", "model", "embedding", *self.spec.metadata,
            ]  # fmt: skip
            copy_sql = (
                f"COPY {self.table} ({', '.join(quote_ident(c) for c in columns)}) FROM STDIN"
            )
            written_chunks = 0
            cursor = conn.connection.driver_connection.cursor()
            with cursor.copy(copy_sql) as copy:
                for position, chunk in enumerate(chunks.itertuples(index=False)):
                    if chunk.row_id in stale:
                        continue
                    copy.write_row(
                        [
                            point_id(
                                self.spec.name, chunk.row_id, chunk.chunk_index, self.model_id
                            ),
                            chunk.row_id,
                            chunk.chunk_index,
                            pending.shard,
                            chunk.text,
                            chunk.chunk_hash,
                            chunk.token_count,
                            self.model_id,
                            batch.vectors[position],
                            *[_copy_value(v) for v in metadata[chunk.row_id]],
                        ]
                    )
                    written_chunks += 1
            cursor.close()
            chunk_counts = chunks.groupby("row_id").size().to_dict() if len(chunks) else {}
            written = [r for r in upsert_ids if r not in stale]
            if written:
                conn.execute(
                    sa.text(
                        f"""INSERT INTO {STATE_SCHEMA}.row_state AS s
                            (target, row_id, shard, content_hash, version, chunk_count,
                             pg_synced_at, deleted)
                        SELECT :t, u.row_id, :shard, u.hash, :v, u.n, now(), false
                        FROM unnest(CAST(:ids AS text[]), CAST(:hashes AS text[]),
                                    CAST(:counts AS int[])) AS u(row_id, hash, n)
                        ON CONFLICT (target, row_id) DO UPDATE SET
                            shard = EXCLUDED.shard, content_hash = EXCLUDED.content_hash,
                            version = EXCLUDED.version, chunk_count = EXCLUDED.chunk_count,
                            pg_synced_at = EXCLUDED.pg_synced_at, deleted = false"""
                    ),
                    {
                        "t": self.target,
                        "shard": pending.shard,
                        "v": self.version,
                        "ids": written,
                        "hashes": [hashes[r] for r in written],
                        "counts": [int(chunk_counts.get(r, 0)) for r in written],
                    },
                )
            removed = [r for r in pending.deleted if r not in stale]
            if removed:
                # Tombstones stay until Qdrant has dropped the row's points too.
                conn.execute(
                    sa.text(
                        f"""UPDATE {STATE_SCHEMA}.row_state SET deleted = true,
                            content_hash = NULL, chunk_count = 0, pg_synced_at = now()
                        WHERE target = :t AND row_id = ANY(:ids)"""
                    ),
                    {"t": self.target, "ids": removed},
                )
                conn.execute(
                    sa.text(
                        f"""DELETE FROM {STATE_SCHEMA}.row_state WHERE target = :t
                        AND row_id = ANY(:ids) AND qdrant_hash IS NULL AND qdrant_chunk_count = 0"""
                    ),
                    {"t": self.target, "ids": removed},
                )
        return WriteStats(len(written), written_chunks, len(removed), len(stale))

    # -- what Qdrant must catch up on ---------------------------------------------------

    def qdrant_lag(self, shard: int, limit: int) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Rows whose Qdrant points differ from pgvector (state) and the chunks to send."""
        meta_cols = "".join(f", c.{quote_ident(m)}" for m in self.spec.metadata)
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            lag = pd.DataFrame(
                conn.execute(
                    sa.text(
                        f"""SELECT row_id, content_hash, chunk_count, qdrant_chunk_count, deleted
                        FROM {STATE_SCHEMA}.row_state WHERE target = :t AND shard = :shard
                        AND (qdrant_hash IS DISTINCT FROM content_hash
                             OR qdrant_chunk_count <> chunk_count)
                        ORDER BY row_id LIMIT :limit"""
                    ),
                    {"t": self.target, "shard": shard, "limit": limit},
                ).fetchall(),
                columns=["row_id", "content_hash", "chunk_count", "qdrant_chunk_count", "deleted"],
                dtype=object,  # a deleted row's NULL hash must stay None, not NaN
            )
            live = lag.loc[~lag["deleted"].astype(bool), "row_id"].tolist()
            result = (
                conn.execute(
                    sa.text(
                        f"""SELECT CAST(c.point_id AS text) AS point_id, c.row_id, c.chunk_index,
                        c.chunk_text, c.embedding{meta_cols}
                    FROM {self.table} AS c WHERE c.row_id = ANY(:ids)
                    ORDER BY c.row_id, c.chunk_index"""
                    ),
                    {"ids": live},
                )
                if live
                else None
            )
            chunks = (
                pd.DataFrame(result.fetchall(), columns=list(result.keys()))
                if result is not None
                else pd.DataFrame(
                    columns=[
                        "point_id",
                        "row_id",
                        "chunk_index",
                        "chunk_text",
                        "embedding",
                        *self.spec.metadata,
                    ]
                )
            )
        return lag, _with_arrays(chunks)

    def mark_qdrant_synced(self, synced: Sequence[tuple[str, str | None, int]]) -> None:
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
                    AND qdrant_chunk_count = 0 AND qdrant_hash IS NULL"""
                ),
                {"t": self.target},
            )

    def qdrant_expected_points(self, shard: int) -> int:
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

    def forget_qdrant(self, shard: int | None = None) -> None:
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

    # -- reads for checks, status and search --------------------------------------------

    def stored_chunks(self, shard: int) -> pd.DataFrame:
        """The shard's stored chunks with vectors and metadata, in row and chunk order."""
        columns = [
            "point_id",
            "row_id",
            "chunk_index",
            "chunk_text",
            "embedding",
            *self.spec.metadata,
        ]
        if not self.table_exists():
            return pd.DataFrame(columns=columns)
        meta_cols = "".join(f", {quote_ident(m)}" for m in self.spec.metadata)
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.text(
                    f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                        chunk_text, embedding{meta_cols}
                    FROM {self.table} WHERE shard = :shard ORDER BY row_id, chunk_index"""
                ),
                {"shard": shard},
            )
            return _with_arrays(pd.DataFrame(result.fetchall(), columns=columns))

    def chunk_counts(self) -> dict[int, int]:
        if not self.table_exists():
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT shard, count(*) AS n FROM {self.table} GROUP BY shard")
            ).fetchall()
        return {row.shard: row.n for row in rows}

    def invalid_vectors(self, shard: int, dimension: int) -> dict[str, int]:
        """Stored vectors of the wrong length or zero norm (pgvector itself rejects NaN)."""
        if not self.table_exists():
            return {"wrong_dimension": 0, "zero_norm": 0, "checked": 0}
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"""SELECT count(*) FILTER (WHERE vector_dims(embedding) <> :d) AS wrong,
                        count(*) FILTER (WHERE vector_norm(embedding) = 0) AS zero,
                        count(*) AS checked
                    FROM {self.table} WHERE shard = :shard"""
                ),
                {"d": dimension, "shard": shard},
            ).one()
        return {"wrong_dimension": row.wrong, "zero_norm": row.zero, "checked": row.checked}

    def sample_chunks(self, shard: int, size: int) -> pd.DataFrame:
        with self.engine.connect() as conn:
            result = conn.execute(
                sa.text(
                    f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_text, embedding
                    FROM {self.table} WHERE shard = :shard ORDER BY md5(CAST(point_id AS text))
                    LIMIT :n"""
                ),
                {"shard": shard, "n": size},
            )
            return _with_arrays(pd.DataFrame(result.fetchall(), columns=list(result.keys())))

    def search(self, vector: np.ndarray, limit: int) -> list[SearchHit]:
        if not self.table_exists():
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                        chunk_text, 1 - (embedding <=> CAST(:q AS vector)) AS score
                    FROM {self.table} ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k"""
                ),
                {"q": np.asarray(vector, dtype=np.float32), "k": limit},
            ).fetchall()
        return [
            SearchHit(r.row_id, r.chunk_index, float(r.score), r.chunk_text, r.point_id)
            for r in rows
        ]


def as_array(value: Any) -> np.ndarray:
    """A pgvector value (pgvector.Vector from the driver) as a float32 numpy array."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


def _with_arrays(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame):
        frame["embedding"] = [as_array(v) for v in frame["embedding"]]
    return frame


def _copy_value(value: Any) -> Any:
    """COPY text format: pandas NA as NULL, JSON values as JSON text."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, dict | list):
        return json.dumps(value)
    if isinstance(value, np.generic):
        return value.item()
    return value
