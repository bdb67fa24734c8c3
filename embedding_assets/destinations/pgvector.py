"""The pgvector destination: a chunk table per target, one row per chunk with its vector
and the configured metadata columns. Written in the same transaction as the ledger, so the
ledger's content hash is exactly what this table holds.

A new table is bulk-loaded without its HNSW index, which is built once when no shard has
work left (building it once is far cheaper than maintaining it row by row); a run that
rewrites most of a table drops it first. Until it exists, search is an exact scan.
"""

import hashlib
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import sqlalchemy as sa

from embedding_assets.core.delta import EmbeddedRows, RowFailure
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_sql
from embedding_assets.settings import SourceSpec
from embedding_assets.state.ddl import shard_lock
from embedding_assets.state.pg_values import is_native, needs_text_copy, payload_expr
from embedding_assets.state.source_sql import (
    SourceSql,
    catalog_columns,
    column_types,
    meta_alias,
    quote_ident,
    quote_literal,
    quote_table,
)

# A write of more chunks than this share of the table (and at least REBUILD_MIN) rebuilds
# the HNSW index afterwards instead of maintaining it.
REBUILD_SHARE = 0.5
REBUILD_MIN_CHUNKS = 20_000
# maintenance_work_mem of the one HNSW build: the build is many times faster while the graph
# fits (1M 384-d vectors need about 2-3 GB).
INDEX_BUILD_MEMORY = os.environ.get("EMBEDDING_ASSETS_INDEX_BUILD_MEMORY", "3GB")
# Errors of a COPY that mean a value does not fit its column (not a lost connection).
REFUSED_VALUE_ERRORS = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError)


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


def vector_text(vector: np.ndarray) -> str:
    """pgvector's text form; %.9g keeps every float32 exactly."""
    return _VECTOR_FORMATS.setdefault(len(vector), "[" + ",".join(["%.9g"] * len(vector)) + "]") % (
        tuple(vector.tolist())
    )


_VECTOR_FORMATS: dict[int, str] = {}

POSTGRES_NAME_LIMIT = 63  # longer identifiers are cut silently, and two cut names may clash
INDEX_SUFFIXES = ("_embedding_hnsw", "_chunk_hash", "_shard")


def relation_name(table: str, suffix: str) -> str:
    """`table + suffix` if Postgres keeps it whole, else a shortened name with a hash of the
    full one, so the indexes of `docs__g1` and `docs__g2` never share a name."""
    name = table + suffix
    if len(name) <= POSTGRES_NAME_LIMIT:
        return name
    digest = hashlib.md5(name.encode()).hexdigest()[:8]
    return f"{table[: POSTGRES_NAME_LIMIT - len(suffix) - 9]}_{digest}{suffix}"


def relation_kind(conn: sa.Connection, schema: str, name: str) -> str | None:
    """pg_class.relkind of schema.name ('r' table, 'v' view, ...), None if there is none."""
    return conn.scalar(
        sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": f"{quote_ident(schema)}.{quote_ident(name)}"},
    )


def view_reads(conn: sa.Connection, schema: str, view: str) -> str | None:
    """The table (schema.name) a view reads, or None if `view` is no view."""
    return conn.scalar(
        sa.text(
            """SELECT DISTINCT n.nspname || '.' || c.relname
            FROM pg_rewrite AS r JOIN pg_depend AS d ON d.objid = r.oid
                AND d.classid = 'pg_rewrite'::regclass
            JOIN pg_class AS c ON c.oid = d.refobjid AND c.oid <> r.ev_class
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE r.ev_class = to_regclass(:v) AND c.relkind IN ('r', 'p')"""
        ),
        {"v": f"{quote_ident(schema)}.{quote_ident(view)}"},
    )


def publish_view(conn: sa.Connection, stable: tuple[str, str], table: tuple[str, str]) -> None:
    """Make the stable view read `table`, in the caller's transaction: readers see the old
    generation until it commits and the new one after, never a mix. A view of another
    dimension cannot be replaced in place, so it is dropped and created again (still one
    transaction)."""
    schema, view = stable
    kind = relation_kind(conn, schema, view)
    if kind not in (None, "v"):
        raise RuntimeError(
            f"{schema}.{view} is a table, not the view embedding_assets keeps for readers; "
            "rename or drop it (or set another `pgvector: {table: ...}`)"
        )
    select = f"SELECT * FROM {quote_table(table)}"
    target = quote_table(stable)
    conn.execute(sa.text(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(schema)}"))
    if kind == "v":
        try:
            with conn.begin_nested():
                conn.execute(sa.text(f"CREATE OR REPLACE VIEW {target} AS {select}"))
            return
        except sa.exc.DBAPIError:
            conn.execute(sa.text(f"DROP VIEW {target}"))
    conn.execute(sa.text(f"CREATE VIEW {target} AS {select}"))


def adopt_table(conn: sa.Connection, stable: tuple[str, str], table: tuple[str, str]) -> None:
    """A chunk table made before generations existed becomes generation 1: renamed with its
    indexes, and the stable name becomes a view over it, in the caller's transaction."""
    schema, old = stable
    new = table[1]
    conn.execute(sa.text(f"ALTER TABLE {quote_table(stable)} RENAME TO {quote_ident(new)}"))
    for suffix in INDEX_SUFFIXES:
        conn.execute(
            sa.text(
                f"ALTER INDEX IF EXISTS {quote_ident(schema)}.{quote_ident(old + suffix)} "
                f"RENAME TO {quote_ident(relation_name(new, suffix))}"
            )
        )
    publish_view(conn, stable, table)


class PgVectorDestination:
    def __init__(self, engine: sa.Engine, spec: SourceSpec, target: str | None = None):
        self.engine = engine
        self.spec = spec
        self.target = target or spec.target  # the ledger key (a generation's)
        self.table = quote_table(spec.pg_table)
        self.name = spec.pg_table[1]
        self.hnsw_index = quote_ident(relation_name(self.name, "_embedding_hnsw"))
        self._columns_catalog: dict[str, tuple[str, str]] | None = None
        self._iterative: bool | None = None

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
            index = quote_ident(relation_name(self.name, suffix))
            conn.execute(sa.text(f"CREATE INDEX {index} ON {self.table} ({column})"))
        return True

    def add_metadata_columns(self, conn: sa.Connection) -> list[str]:
        """Metadata columns added to sources.yaml since the table was made: added to it
        (rows get their values when the diff sends them again, without re-embedding). A
        column no longer configured is left as it is, with its last values."""
        have = catalog_columns(conn, self.table)
        missing = [name for name in self.spec.metadata if name not in have]
        if not missing:
            return []
        types = column_types(conn, SourceSql(self.spec).metadata_probe())
        by_name = dict(zip(self.spec.metadata, types, strict=True))
        for name in missing:
            conn.execute(
                sa.text(f"ALTER TABLE {self.table} ADD COLUMN {quote_ident(name)} {by_name[name]}")
            )
        self._columns_catalog = None
        return missing

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
        shard_lock(conn, self.target, -1)
        if self.has_index(conn):
            return False
        conn.execute(sa.text(f"SET LOCAL maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"))
        # A build over millions of rows runs for minutes: past the usual statement limit.
        conn.execute(sa.text("SET LOCAL statement_timeout = 0"))
        # One parallel worker beside the leader: both cores of a small machine.
        conn.execute(sa.text("SET LOCAL max_parallel_maintenance_workers = 1"))
        hnsw = self.spec.pgvector.hnsw
        conn.execute(
            sa.text(
                f"CREATE INDEX IF NOT EXISTS {self.hnsw_index} "
                f"ON {self.table} USING hnsw (embedding vector_cosine_ops) "
                f"WITH (m = {int(hnsw.m)}, ef_construction = {int(hnsw.ef_construction)})"
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
    ) -> tuple[int, dict[str, RowFailure]]:
        """Delete the chunks of every row in the batch (written or deleted) and COPY the new
        ones, except rows in `skip`. Returns the chunks written, and the rows Postgres
        refused (a value that does not fit its column): those keep their stored chunks,
        found by halving the batch, so one bad row never blocks its neighbours."""
        pending = batch.pending
        ids = [r for r in pending.rows["row_id"].tolist() + pending.deleted if r not in skip]
        if not ids:
            return 0, {}
        metas = [meta_alias(i) for i in range(len(self.spec.metadata))]
        metadata = {
            values[0]: values[1:]
            for values in pending.rows[["row_id", *metas]].itertuples(index=False, name=None)
        }
        columns = [
            "point_id", "row_id", "chunk_index", "shard", "chunk_text", "chunk_hash",
            "token_count", "model", "embedding", *self.spec.metadata,
        ]  # fmt: skip
        types = self._column_types(conn, columns)
        meta_types = types[len(columns) - len(self.spec.metadata) :]
        binary = all(is_native(t) for t in meta_types) and not any(
            needs_text_copy(list(values)) for values in metadata.values()
        )
        chunks = batch.chunked.chunks
        by_row: dict[str, list[list[Any]]] = {}
        for position, (row_id, chunk_index, text, chunk_hash, token_count) in enumerate(
            zip(
                *(
                    chunks[c].tolist()
                    for c in ("row_id", "chunk_index", "text", "chunk_hash", "token_count")
                ),
                strict=True,
            )
        ):
            if row_id in skip:
                continue
            pid = point_id(self.spec.name, row_id, chunk_index, model_id)
            vector = batch.vectors[position]
            by_row.setdefault(row_id, []).append(
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
                    *metadata[row_id],
                ]
            )
        copy_sql = f"COPY {self.table} ({', '.join(quote_ident(c) for c in columns)}) FROM STDIN"
        if binary:
            copy_sql += " WITH (FORMAT BINARY)"
        hashes = dict(zip(pending.rows["row_id"], pending.rows["content_hash"], strict=True))
        refused: dict[str, RowFailure] = {}
        delete = sa.text(f"DELETE FROM {self.table} WHERE row_id = ANY(:ids)")
        # Deleted rows and rows without chunks (empty text) lose their chunks here; a row
        # with chunks loses its old ones with the COPY of its new ones, so a refused row
        # keeps what it had.
        conn.execute(delete, {"ids": [r for r in ids if r not in by_row]})

        def copy_groups(groups: list[list[list[Any]]]) -> int:
            try:
                with conn.begin_nested():
                    conn.execute(delete, {"ids": [group[0][1] for group in groups]})
                    return self._copy(conn, copy_sql, types if binary else None, groups)
            except REFUSED_VALUE_ERRORS as exc:
                if len(groups) > 1:
                    half = len(groups) // 2
                    return copy_groups(groups[:half]) + copy_groups(groups[half:])
                row_id = groups[0][0][1]
                refused[row_id] = RowFailure(
                    hashes[row_id],
                    "unstorable",
                    f"{self.spec.pg_table[0]}.{self.name} refused this row's values "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())}); fix the value, "
                    "or if a source column changed type, drop the chunk table (`DROP TABLE "
                    f"{self.table} CASCADE`: the readers' view goes with it, and the next "
                    "sync makes both again), then `embedding-assets errors replay`",
                )
                return 0

        return copy_groups(list(by_row.values())), refused

    def _copy(
        self,
        conn: sa.Connection,
        copy_sql: str,
        binary_types: list[str] | None,
        groups: list[list[list[Any]]],
    ) -> int:
        cursor = conn.connection.driver_connection.cursor()
        written = 0
        try:
            with cursor.copy(copy_sql) as copy:
                if binary_types is not None:
                    # Binary COPY: vectors go as packed floats, ~30x faster than as text.
                    copy.set_types(binary_types)
                for group in groups:
                    for record in group:
                        copy.write_row(record)
                        written += 1
        finally:
            cursor.close()
        return written

    def _column_types(self, conn: sa.Connection, columns: list[str]) -> list[str]:
        """The chunk table's column types (format_type names), in `columns` order."""
        catalog = self._catalog(conn)
        return [catalog[c][0] for c in columns]

    def _catalog(self, conn: sa.Connection) -> dict[str, tuple[str, str]]:
        """{column: (format_type name, pg_type.typtype)} of the chunk table (cached)."""
        if self._columns_catalog is None:
            self._columns_catalog = catalog_columns(conn, self.table)
        return self._columns_catalog

    # -- reads --------------------------------------------------------------------------

    def reusable_vectors(
        self, chunk_hashes: Sequence[str], also_from: Sequence[tuple[str, str]] = ()
    ) -> dict[str, np.ndarray]:
        """Stored vectors for these chunk hashes: this table's (it holds one model only),
        then for hashes still missing those of `also_from`, tables of other generations
        with the same model (a template change leaves most chunk texts equal)."""
        wanted = set(chunk_hashes)
        found: dict[str, np.ndarray] = {}
        with self.engine.connect() as conn:
            for table in (self.spec.pg_table, *also_from):
                if not wanted:
                    break
                if relation_kind(conn, *table) is None:
                    continue
                rows = fetch_binary(
                    conn,
                    f"SELECT DISTINCT ON (chunk_hash) chunk_hash, embedding "
                    f"FROM {quote_table(table)} WHERE chunk_hash = ANY(%(hashes)s)",
                    {"hashes": list(wanted)},
                    ["chunk_hash", "embedding"],
                )
                found.update(zip(rows["chunk_hash"], rows["embedding"], strict=True))
                wanted.difference_update(rows["chunk_hash"])
        return found

    COLUMNS = ("point_id", "row_id", "chunk_index", "chunk_text", "embedding", "metadata")

    def _columns(self) -> list[str]:
        return list(self.COLUMNS)

    def chunks_of_rows(self, conn: sa.Connection, ids: Sequence[str]) -> pd.DataFrame:
        """The chunks of these rows with vectors and their metadata as a {column: JSON
        value} dict (the Qdrant payload, see `payload_select`), in row and chunk order."""
        if not ids:
            return pd.DataFrame(columns=self._columns())
        return fetch_binary(
            conn,
            f"""SELECT CAST(c.point_id AS text) AS point_id, c.row_id, c.chunk_index,
                c.chunk_text, c.embedding, {self.payload_select(conn, "c.").replace("%", "%%")}
            FROM {self.table} AS c WHERE c.row_id = ANY(%(ids)s)
            ORDER BY c.row_id, c.chunk_index""",
            {"ids": list(ids)},
            self._columns(),
        )

    def stored_chunks(self, shard: int) -> pd.DataFrame:
        """The shard's stored chunks with vectors and metadata (as `chunks_of_rows`)."""
        if not self.table_exists():
            return pd.DataFrame(columns=self._columns())
        with self.engine.connect() as conn:
            return fetch_binary(
                conn,
                f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                    chunk_text, embedding, {self.payload_select(conn).replace("%", "%%")}
                FROM {self.table} WHERE shard = %(shard)s ORDER BY row_id, chunk_index""",
                {"shard": shard},
                self._columns(),
            )

    def payload_select(self, conn: sa.Connection, alias: str = "") -> str:
        """SQL: the metadata columns as one jsonb object {column name: value}, each value
        converted by its type (state.pg_values.payload_expr), named `metadata`."""
        if not self.spec.metadata:
            return "CAST('{}' AS jsonb) AS metadata"
        kinds = self._catalog(conn)
        parts = [
            f"jsonb_build_object({quote_literal(name)}, "
            f"{payload_expr(alias + quote_ident(name), *kinds[name])})"
            for name in self.spec.metadata
        ]
        # One object per column, joined: jsonb_build_object takes at most 100 arguments.
        return f"({' || '.join(parts)}) AS metadata"

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

    def invalid_vectors(self, shard: int | None, dimension: int) -> dict[str, int]:
        """Stored vectors (of the shard, or all) of the wrong length or zero norm (pgvector
        itself rejects NaN)."""
        if not self.table_exists():
            return {"wrong_dimension": 0, "zero_norm": 0, "checked": 0}
        only = "WHERE shard = :shard" if shard is not None else ""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"""SELECT count(*) FILTER (WHERE vector_dims(embedding) <> :d) AS wrong,
                        count(*) FILTER (WHERE vector_norm(embedding) = 0) AS zero,
                        count(*) AS checked
                    FROM {self.table} {only}"""
                ),
                {"d": dimension, "shard": shard},
            ).one()
        return {"wrong_dimension": row.wrong, "zero_norm": row.zero, "checked": row.checked}

    def sample_chunks(self, shard: int | None, size: int) -> pd.DataFrame:
        """A deterministic sample of the shard's (or the table's) chunks with vectors."""
        columns = ["point_id", "row_id", "chunk_text", "embedding"]
        if not self.table_exists():
            return pd.DataFrame(columns=columns)
        only = "WHERE shard = %(shard)s" if shard is not None else ""
        with self.engine.connect() as conn:
            return fetch_binary(
                conn,
                f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_text, embedding
                FROM {self.table} {only} ORDER BY md5(CAST(point_id AS text))
                LIMIT %(n)s""",
                {"shard": shard, "n": size},
                columns,
            )

    def search(
        self, vector: np.ndarray, limit: int, shard: int | None = None, exact: bool = False
    ) -> list[SearchHit]:
        """Nearest chunks by cosine distance (only the shard's, if given). Approximate
        through the HNSW index with the source's `ef_search` and iterative scan; `exact`
        scans every chunk instead (the ground truth the recall check compares with)."""
        if not self.table_exists():
            return []
        only = "WHERE shard = :shard" if shard is not None else ""
        with self.engine.begin() as conn:
            self._search_settings(conn, exact, limit)
            rows = conn.execute(
                sa.text(
                    f"""WITH hits AS MATERIALIZED (
                        SELECT point_id, row_id, chunk_index, chunk_text,
                            embedding <=> CAST(:q AS vector) AS distance
                        FROM {self.table} {only}
                        ORDER BY embedding <=> CAST(:q AS vector) LIMIT :k)
                    SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                        chunk_text, 1 - distance AS score
                    FROM hits ORDER BY distance, point_id"""
                ),
                {"q": np.asarray(vector, dtype=np.float32), "k": limit, "shard": shard},
            ).fetchall()
        return [
            SearchHit(r.row_id, r.chunk_index, float(r.score), r.chunk_text, r.point_id)
            for r in rows
        ]

    def _search_settings(self, conn: sa.Connection, exact: bool, limit: int) -> None:
        """This transaction's search parameters (SET LOCAL: nothing leaks to the pool)."""
        if exact:
            conn.execute(sa.text("SELECT set_config('enable_indexscan', 'off', true)"))
            return
        hnsw = self.spec.pgvector.hnsw
        # At least the limit's worth of candidates, whatever the config says.
        conn.execute(
            sa.text("SELECT set_config('hnsw.ef_search', :ef, true)"),
            {"ef": str(max(int(hnsw.ef_search), limit))},
        )
        if hnsw.iterative_scan != "off" and self._has_iterative_scan(conn):
            conn.execute(
                sa.text("SELECT set_config('hnsw.iterative_scan', :mode, true)"),
                {"mode": hnsw.iterative_scan},
            )

    def _has_iterative_scan(self, conn: sa.Connection) -> bool:
        """pgvector 0.8 added hnsw.iterative_scan; older servers refuse the setting."""
        if self._iterative is None:
            version = conn.scalar(
                sa.text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            )
            parts = tuple(int(p) for p in re.findall(r"\d+", version or "0")[:2])
            self._iterative = parts >= (0, 8)
        return self._iterative
