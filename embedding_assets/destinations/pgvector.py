"""The pgvector destination: a chunk table per target, one row per chunk with its vector
and the configured metadata columns. Written in the same transaction as the ledger, so the
ledger's content hash is exactly what this table holds.

A new table is bulk-loaded without its HNSW index, which is built once when no shard has
work left (building it once is far cheaper than maintaining it row by row); a run that
rewrites most of a table drops it first. Until it exists, search is an exact scan.
"""

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import psycopg
import sqlalchemy as sa

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import EmbeddedRows, RowFailure
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_sql
from embedding_assets.destinations.pg_relations import relation_kind, relation_name
from embedding_assets.destinations.pg_vectors import fetch_binary, vector_text
from embedding_assets.destinations.pgvector_index import ChunkTableIndex
from embedding_assets.destinations.pgvector_search import ChunkTableSearch
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

# Errors of a COPY that mean a value does not fit its column (not a lost connection).
REFUSED_VALUE_ERRORS = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError)


class PgVectorDestination(ChunkTableIndex, ChunkTableSearch):
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
