"""The pgvector destination: a chunk table per target, one row per chunk with its vector
and the configured metadata columns. Written in the same transaction as the ledger, so the
ledger's content hash is exactly what this table holds.

A new table is bulk-loaded without its HNSW index, which is built once when no shard has
work left (building it once is far cheaper than maintaining it row by row); a run that
rewrites most of a table drops it first. Until it exists, search is an exact scan.
"""

import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from psycopg.types.json import Json, Jsonb

from embedding_assets.core.delta import EmbeddedRows
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_sql
from embedding_assets.settings import SourceSpec
from embedding_assets.state.ddl import shard_lock
from embedding_assets.state.source_sql import SourceSql, column_types, quote_ident, quote_table

# A write of more chunks than this share of the table (and at least REBUILD_MIN) rebuilds
# the HNSW index afterwards instead of maintaining it.
REBUILD_SHARE = 0.5
REBUILD_MIN_CHUNKS = 20_000
# maintenance_work_mem of the one HNSW build: the build is many times faster while the graph
# fits (1M 384-d vectors need about 2-3 GB).
INDEX_BUILD_MEMORY = os.environ.get("EMBEDDING_ASSETS_INDEX_BUILD_MEMORY", "3GB")
# Metadata types whose Python values psycopg writes in binary COPY as they come from the
# source; any other type makes the write use text COPY.
BINARY_SAFE_TYPES = frozenset(
    {
        "text", "character varying", "character", "integer", "bigint", "smallint", "boolean",
        "double precision", "real", "numeric", "date", "timestamp without time zone",
        "timestamp with time zone", "uuid",
    }
)  # fmt: skip


@dataclass(frozen=True)
class SearchHit:
    row_id: str
    chunk_index: int
    score: float
    text: str
    point_id: str


def as_array(value: Any) -> np.ndarray:
    """A pgvector value (pgvector.Vector from the driver) as a float32 numpy array."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


def with_arrays(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame):
        frame["embedding"] = [as_array(v) for v in frame["embedding"]]
    return frame


def fetch_binary(
    conn: sa.Connection, query: str, params: dict[str, Any], columns: list[str]
) -> pd.DataFrame:
    """Rows with vectors fetched in binary (pgvector's binary loader is a buffer copy; the
    text form is parsed float by float). `query` uses psycopg's %(name)s placeholders."""
    cursor = conn.connection.driver_connection.cursor(binary=True)
    try:
        cursor.execute(query, params)
        frame = pd.DataFrame(cursor.fetchall(), columns=columns)
    finally:
        cursor.close()
    return with_arrays(frame)


JSON_TYPES = {"json": Json, "jsonb": Jsonb}


def copy_value(value: Any, pg_type: str) -> Any:
    """A metadata value for COPY into a column of `pg_type`: pandas NA as NULL; a json or
    jsonb value (object, array, string, number or boolean) as JSON; an array column's
    list as a Postgres array (psycopg's list dumper), never as JSON text."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    wrap = JSON_TYPES.get(pg_type)
    return wrap(value) if wrap is not None else value


def vector_text(vector: np.ndarray) -> str:
    """pgvector's text form; %.9g keeps every float32 exactly."""
    return _VECTOR_FORMATS.setdefault(len(vector), "[" + ",".join(["%.9g"] * len(vector)) + "]") % (
        tuple(vector.tolist())
    )


_VECTOR_FORMATS: dict[int, str] = {}


class PgVectorDestination:
    def __init__(self, engine: sa.Engine, spec: SourceSpec):
        self.engine = engine
        self.spec = spec
        self.table = quote_table(spec.pg_table)
        self.name = spec.pg_table[1]
        self.hnsw_index = quote_ident(self.name + "_embedding_hnsw")
        self._types: dict[str, str] | None = None

    # -- schema -------------------------------------------------------------------------

    def table_exists(self, conn: sa.Connection | None = None) -> bool:
        query = sa.text("SELECT to_regclass(:t) IS NOT NULL")
        if conn is not None:
            return bool(conn.scalar(query, {"t": self.table}))
        with self.engine.connect() as own:
            return bool(own.scalar(query, {"t": self.table}))

    def ensure(self, conn: sa.Connection, dimension: int) -> bool:
        """Create the chunk table for `dimension` (without its HNSW index: a bulk load comes
        first). Returns whether it was created."""
        if self.table_exists(conn):
            return False
        schema, _ = self.spec.pg_table
        conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"))
        types = (
            column_types(conn, SourceSql(self.spec).metadata_probe()) if self.spec.metadata else []
        )
        meta_cols = "".join(
            f", {quote_ident(name)} {pg_type}"
            for name, pg_type in zip(self.spec.metadata, types, strict=True)
        )
        conn.execute(
            sa.text(
                f"""CREATE TABLE {self.table} (
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
        for suffix, column in (("_chunk_hash", "chunk_hash"), ("_shard", "shard")):
            conn.execute(
                sa.text(
                    f"CREATE INDEX {quote_ident(self.name + suffix)} ON {self.table} ({column})"
                )
            )
        return True

    def has_index(self, conn: sa.Connection) -> bool:
        schema, _ = self.spec.pg_table
        return bool(
            conn.scalar(
                sa.text("SELECT to_regclass(:i) IS NOT NULL"),
                {"i": f"{quote_ident(schema)}.{self.hnsw_index}"},
            )
        )

    def build_index(self, conn: sa.Connection) -> bool:
        """Build the HNSW index if missing (under the target's lock, so one run builds it)."""
        shard_lock(conn, self.spec.target, -1)
        if self.has_index(conn):
            return False
        conn.execute(sa.text(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"))
        # A build over millions of rows runs for minutes: past the usual statement limit.
        conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
        # One parallel worker beside the leader: both cores of a small machine.
        conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 1"))
        conn.execute(
            sa.text(
                f"CREATE INDEX IF NOT EXISTS {self.hnsw_index} "
                f"ON {self.table} USING hnsw (embedding vector_cosine_ops)"
            )
        )
        return True

    def drop_index_for_rewrite(self, conn: sa.Connection, chunks_to_write: int) -> bool:
        """Drop the HNSW index before a write that rewrites most of the table."""
        if chunks_to_write < REBUILD_MIN_CHUNKS or not self.has_index(conn):
            return False
        stored = conn.scalar(
            sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass(:t)"),
            {"t": self.table},
        )
        if stored is not None and stored >= 0 and chunks_to_write < REBUILD_SHARE * stored:
            return False
        schema, _ = self.spec.pg_table
        conn.execute(sa.text(f"DROP INDEX IF EXISTS {quote_ident(schema)}.{self.hnsw_index}"))
        return True

    def reshard(self, conn: sa.Connection, shards: int) -> None:
        if self.table_exists(conn):
            conn.execute(sa.text(f"UPDATE {self.table} SET shard = {shard_sql('row_id', shards)}"))

    # -- writes (inside the ledger's transaction) ---------------------------------------

    def replace_rows(
        self, conn: sa.Connection, batch: EmbeddedRows, skip: set[str], model_id: str
    ) -> int:
        """Delete the chunks of every row in the batch (written or deleted) and COPY the new
        ones, except rows in `skip`. Returns the chunks written."""
        pending = batch.pending
        ids = [r for r in pending.rows["row_id"].tolist() + pending.deleted if r not in skip]
        if not ids:
            return 0
        conn.execute(sa.text(f"DELETE FROM {self.table} WHERE row_id = ANY(:ids)"), {"ids": ids})
        chunks = batch.chunked.chunks
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
        types = self._column_types(conn, columns)
        meta_types = types[len(columns) - len(self.spec.metadata) :]
        binary = all(t in BINARY_SAFE_TYPES for t in meta_types)
        copy_sql = f"COPY {self.table} ({', '.join(quote_ident(c) for c in columns)}) FROM STDIN"
        written = 0
        cursor = conn.connection.driver_connection.cursor()
        try:
            with cursor.copy(copy_sql + (" WITH (FORMAT BINARY)" if binary else "")) as copy:
                if binary:
                    # Binary COPY: vectors go as packed floats, ~30x faster than as text.
                    copy.set_types(types)
                for position, chunk in enumerate(
                    zip(
                        *(
                            chunks[c].tolist()
                            for c in ("row_id", "chunk_index", "text", "chunk_hash", "token_count")
                        ),
                        strict=True,
                    )
                ):
                    row_id, chunk_index, text, chunk_hash, token_count = chunk
                    if row_id in skip:
                        continue
                    pid = point_id(self.spec.name, row_id, chunk_index, model_id)
                    vector = batch.vectors[position]
                    copy.write_row(
                        [
                            uuid.UUID(pid) if binary else pid,
                            row_id,
                            chunk_index,
                            pending.shard,
                            text,
                            chunk_hash,
                            token_count,
                            model_id,
                            vector if binary else vector_text(vector),
                            *[
                                copy_value(v, t)
                                for v, t in zip(metadata[row_id], meta_types, strict=True)
                            ],
                        ]
                    )
                    written += 1
        finally:
            cursor.close()
        return written

    def _column_types(self, conn: sa.Connection, columns: list[str]) -> list[str]:
        """The chunk table's column types (format_type names), in `columns` order."""
        if self._types is None:
            rows = conn.execute(
                sa.text(
                    """SELECT attname, format_type(atttypid, NULL) AS type FROM pg_attribute
                    WHERE attrelid = to_regclass(:t) AND attnum > 0 AND NOT attisdropped"""
                ),
                {"t": self.table},
            ).fetchall()
            self._types = {r.attname: r.type for r in rows}
        return [self._types[c] for c in columns]

    # -- reads --------------------------------------------------------------------------

    def reusable_vectors(self, chunk_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        """Stored vectors for these chunk hashes (this table holds one model only)."""
        if not chunk_hashes or not self.table_exists():
            return {}
        with self.engine.connect() as conn:
            found = fetch_binary(
                conn,
                f"SELECT DISTINCT ON (chunk_hash) chunk_hash, embedding FROM {self.table} "
                "WHERE chunk_hash = ANY(%(hashes)s)",
                {"hashes": list(set(chunk_hashes))},
                ["chunk_hash", "embedding"],
            )
        return dict(zip(found["chunk_hash"], found["embedding"], strict=True))

    def _columns(self) -> list[str]:
        return ["point_id", "row_id", "chunk_index", "chunk_text", "embedding", *self.spec.metadata]

    def chunks_of_rows(self, conn: sa.Connection, ids: Sequence[str]) -> pd.DataFrame:
        """The chunks of these rows with vectors and metadata, in row and chunk order."""
        if not ids:
            return pd.DataFrame(columns=self._columns())
        return fetch_binary(
            conn,
            f"""SELECT CAST(c.point_id AS text) AS point_id, c.row_id, c.chunk_index,
                c.chunk_text, c.embedding{self._meta_select("c.")}
            FROM {self.table} AS c WHERE c.row_id = ANY(%(ids)s)
            ORDER BY c.row_id, c.chunk_index""",
            {"ids": list(ids)},
            self._columns(),
        )

    def stored_chunks(self, shard: int) -> pd.DataFrame:
        """The shard's stored chunks with vectors and metadata, in row and chunk order."""
        if not self.table_exists():
            return pd.DataFrame(columns=self._columns())
        with self.engine.connect() as conn:
            return fetch_binary(
                conn,
                f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                    chunk_text, embedding{self._meta_select()}
                FROM {self.table} WHERE shard = %(shard)s ORDER BY row_id, chunk_index""",
                {"shard": shard},
                self._columns(),
            )

    def _meta_select(self, alias: str = "") -> str:
        return "".join(f", {alias}{quote_ident(m)}" for m in self.spec.metadata)

    def chunk_counts(self) -> dict[int, int]:
        if not self.table_exists():
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT shard, count(*) AS n FROM {self.table} GROUP BY shard")
            ).fetchall()
        return {row.shard: row.n for row in rows}

    def chunk_count(self, shard: int) -> int:
        if not self.table_exists():
            return 0
        with self.engine.connect() as conn:
            return int(
                conn.scalar(
                    sa.text(f"SELECT count(*) FROM {self.table} WHERE shard = :s"), {"s": shard}
                )
            )

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
        columns = ["point_id", "row_id", "chunk_text", "embedding"]
        if not self.table_exists():
            return pd.DataFrame(columns=columns)
        with self.engine.connect() as conn:
            return fetch_binary(
                conn,
                f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_text, embedding
                FROM {self.table} WHERE shard = %(shard)s ORDER BY md5(CAST(point_id AS text))
                LIMIT %(n)s""",
                {"shard": shard, "n": size},
                columns,
            )

    def search(self, vector: np.ndarray, limit: int, shard: int | None = None) -> list[SearchHit]:
        """Nearest chunks by cosine distance (only the shard's, if given)."""
        if not self.table_exists():
            return []
        only = "WHERE shard = :shard" if shard is not None else ""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                        chunk_text, 1 - (embedding <=> CAST(:q AS vector)) AS score
                    FROM {self.table} {only}
                    ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k"""
                ),
                {"q": np.asarray(vector, dtype=np.float32), "k": limit, "shard": shard},
            ).fetchall()
        return [
            SearchHit(r.row_id, r.chunk_index, float(r.score), r.chunk_text, r.point_id)
            for r in rows
        ]
