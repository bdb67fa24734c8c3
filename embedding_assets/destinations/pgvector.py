"""The pgvector destination: a chunk table per target, one row per chunk with its vector
and the configured metadata columns. Written in the same transaction as the ledger, so the
ledger's content hash is exactly what this table holds.

A new table is bulk-loaded without its HNSW index, which is built once when no shard has
work left (building it once is far cheaper than maintaining it row by row); a run that
rewrites most of a table drops it first. Until it exists, search is an exact scan.
"""

import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import RowFailure
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_sql
from embedding_assets.destinations.base import DestinationWrite, Repair, RowsToWrite
from embedding_assets.destinations.lexical import ensure_lexical
from embedding_assets.destinations.pg_relations import relation_name
from embedding_assets.destinations.pg_vectors import vector_text
from embedding_assets.destinations.pgvector_index import ChunkTableIndex
from embedding_assets.destinations.pgvector_reads import ChunkTableReads
from embedding_assets.state.ddl import STATE_SCHEMA, ensure_schema, shard_lock
from embedding_assets.state.ledger import LOST_VERSION, Ledger
from embedding_assets.state.pg_values import is_native, needs_text_copy
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.source_sql import (
    SourceSql,
    catalog_columns,
    column_types,
    meta_alias,
    quote_ident,
    quote_table,
)

# Errors of a COPY that mean a value does not fit its column (not a lost connection).
REFUSED_VALUE_ERRORS = (psycopg.DataError, psycopg.IntegrityError, TypeError, ValueError)


class PgVectorDestination(ChunkTableIndex, ChunkTableReads):
    """The chunk table, a `TransactionalDestination`: written in the ledger's transaction."""

    name = "pgvector"

    def __init__(self, engine: sa.Engine, spec: SourceSpec, ledger: Ledger):
        self.engine = engine
        self.spec = spec
        self.ledger = ledger  # records whether the HNSW index is deferred
        self.target = ledger.target  # the ledger key (a generation's)
        self.table = quote_table(spec.pg_table)
        self.table_name = spec.pg_table[1]
        self.hnsw_index = quote_ident(relation_name(self.table_name, "_embedding_hnsw"))
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
        ensure_schema(conn, schema)
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
            index = quote_ident(relation_name(self.table_name, suffix))
            conn.execute(sa.text(f"CREATE INDEX {index} ON {self.table} ({column})"))
        return True

    def ensure_lexical(self, conn: sa.Connection) -> str | None:
        """The full-text column and its GIN index as `hybrid:` asks (see `lexical`)."""
        index = quote_ident(relation_name(self.table_name, "_lexical"))
        return ensure_lexical(conn, self.table, index, self.spec.hybrid)

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

    # -- the destination protocol -------------------------------------------------------

    def prepare(self, conn: sa.Connection, dimension: int, live: bool, enqueue: bool) -> None:
        """Nothing per write: the chunk table is made with the target's record, under the DDL
        lock (`SourceRuntime.ensure_target`), before any write."""

    def refusals(self, conn: sa.Connection, rows: RowsToWrite) -> dict[str, RowFailure]:
        return {}  # a value Postgres refuses is found by the write itself

    def write(self, conn: sa.Connection, rows: RowsToWrite) -> DestinationWrite:
        """Replace the rows' chunks; a write that rewrites most of the table drops the HNSW
        index first (rebuilt once the bulk load is done)."""
        dropped = self.drop_index_for_rewrite(conn, len(rows.batch.chunked.chunks))
        if dropped:
            self.ledger.set_vector_index(conn, "deferred")
        chunks_written, refused = self.replace_rows(conn, rows)
        return DestinationWrite(
            {"chunks_written": chunks_written, "vector_index_dropped_for_rewrite": dropped},
            refused,
        )

    def build_index(self, live: bool, work_left: Callable[[], bool]) -> DestinationWrite:
        record = self.ledger.record()
        if record is None or record.vector_index != "deferred" or work_left():
            return DestinationWrite()
        started = time.perf_counter()
        with self.engine.begin() as conn:
            built = self.create_index(conn)
            self.ledger.set_vector_index(conn, "built")
        seconds = round(time.perf_counter() - started, 3) if built else 0.0
        return DestinationWrite(
            {"vector_index_built": built, "index_build_duration_seconds": seconds}
        )

    def static_metadata(self) -> dict[str, object]:
        return {
            "pgvector_table": self.table,
            "vector_index_dropped_for_rewrite": False,
            "vector_index_built": False,
            "index_build_duration_seconds": 0.0,
        }

    def count(self, shard: int | None = None) -> int:
        if shard is None:
            return sum(self.chunk_counts().values())
        return self.chunk_count(shard)

    def repair(self, shard: int | None, enqueue: bool) -> Repair:
        """Mark the shard's rows whose chunks the table lacks as lost (and queue them); delete
        chunks of rows the ledger does not hold."""
        if shard is None:
            found = [self.repair(index, enqueue) for index in range(self.spec.shards)]
            return Repair(sum(r.rows_pending for r in found), sum(r.removed for r in found))
        table_exists = self.table_exists()
        held = (
            f"(SELECT row_id, count(*) AS n FROM {self.table} WHERE shard = :s GROUP BY row_id)"
            if table_exists
            else "(SELECT NULL::text AS row_id, 0::bigint AS n WHERE false)"
        )
        with self.engine.begin() as conn:
            shard_lock(conn, self.target, shard)
            lost = conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.row_state AS st SET version = :lost
                    FROM {STATE_SCHEMA}.row_state AS s LEFT JOIN {held} AS c
                        ON c.row_id = s.row_id
                    WHERE s.target = :t AND s.shard = :s AND NOT s.deleted
                        AND s.version <> :lost AND s.chunk_count <> coalesce(c.n, 0)
                        AND st.target = s.target AND st.row_id = s.row_id
                    RETURNING st.row_id"""
                ),
                {"t": self.target, "s": shard, "lost": LOST_VERSION},
            ).fetchall()
            orphans = 0
            if table_exists:
                orphans = conn.execute(
                    sa.text(
                        f"""DELETE FROM {self.table} AS c WHERE c.shard = :s AND NOT EXISTS (
                            SELECT 1 FROM {STATE_SCHEMA}.row_state AS st WHERE st.target = :t
                            AND st.row_id = c.row_id AND NOT st.deleted)"""
                    ),
                    {"t": self.target, "s": shard},
                ).rowcount
            if lost and enqueue:
                ChangeQueue(self.engine, self.target).enqueue(
                    conn, [(shard, r.row_id) for r in lost]
                )
        return Repair(len(lost), orphans)

    # -- writes (inside the ledger's transaction) ---------------------------------------

    def replace_rows(
        self, conn: sa.Connection, rows: RowsToWrite
    ) -> tuple[int, dict[str, RowFailure]]:
        """Delete the chunks of every written or removed row and COPY the written rows' new
        ones. Returns the chunks written, and the rows Postgres refused (a value that does not
        fit its column): those keep their stored chunks, found by halving the batch, so one
        bad row never blocks its neighbours."""
        batch, model_id = rows.batch, rows.model_id
        pending = batch.pending
        ids = rows.written + rows.removed
        storing = set(rows.written)
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
            if row_id not in storing:
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
                    f"{self.spec.pg_table[0]}.{self.table_name} refused this row's values "
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
