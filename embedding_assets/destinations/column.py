"""The write-back destination: one vector per row in a `vector(d)` column of the source table
(or of a 1:1 side table keyed by the row's id), where applications query it directly.

- Written in the transaction that updates the ledger and acknowledges the change feed, so a
  crash leaves all or nothing, like the chunk table.
- Only the vector columns are set, so the capture triggers (which compare the columns the
  source reads) enqueue nothing, and no content hash changes.
- A row is written only if its content hash, computed again from the row as it is now,
  still equals the hash its vector was computed from: a row changed during the run keeps
  what it had, and the change already queued brings its new vector.
- Generations: the live generation owns `<column>`; any other generation N writes
  `<column>__gN`. Promotion renames both in its transaction (the old live column becomes
  `<column>__g<old>`), so readers of the column switch models at once.
"""

import hashlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa

from embedding_assets.config.destinations import WriteBackSpec
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import RowFailure
from embedding_assets.core.row_vectors import row_vectors
from embedding_assets.destinations.base import DestinationWrite, Repair, RowsToWrite
from embedding_assets.destinations.column_schema import ColumnSchema, generation_column
from embedding_assets.destinations.column_search import ColumnReads
from embedding_assets.destinations.pg_relations import POSTGRES_NAME_LIMIT
from embedding_assets.destinations.pg_vectors import vector_text
from embedding_assets.destinations.pgvector_index import INDEX_BUILD_MEMORY
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.ledger import LOST_VERSION
from embedding_assets.state.privileges import row_security_applies
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.source_sql import (
    SourceSql,
    catalog_columns,
    column_types,
    quote_ident,
    quote_table,
)

log = logging.getLogger(__name__)


class ColumnDestination(ColumnSchema, ColumnReads):
    """The write-back column, a `TransactionalDestination`: written in the ledger's
    transaction, guarded by each row's content hash as it is now."""

    name = "column"

    def __init__(self, engine: sa.Engine, spec: SourceSpec, target: str, number: int):
        assert spec.write_back is not None
        self.engine = engine
        self.spec = spec
        self.write_back: WriteBackSpec = spec.write_back
        self.target = target
        self.number = number
        self.sql = SourceSql(spec)
        self.side_table = self.write_back.table is not None
        self.qualified = spec.write_back_table
        self.relation = quote_table(self.qualified)
        self._id_type: str | None = None
        self.ready: tuple[int, bool] | None = None  # (dimension, live) checked

    # -- names --------------------------------------------------------------------------

    def columns(self, live: bool) -> list[str]:
        """This generation's vector, model and time columns (those configured)."""
        return [generation_column(c, self.number, live) for c in self.write_back.columns]

    @property
    def index_name(self) -> str:
        name = f"ea_{self.spec.name}_g{self.number}_write_back_hnsw"
        if len(name) > POSTGRES_NAME_LIMIT:
            name = "ea_wb_" + hashlib.md5(name.encode()).hexdigest()
        return name

    def id_type(self, conn: sa.Connection) -> str:
        if self._id_type is None:
            probe = self.sql.column_types_probe([self.spec.id_column])
            self._id_type = column_types(conn, probe)[0]
        return self._id_type

    def _id(self, alias: str) -> str:
        return f"{alias}.{quote_ident(self.spec.id_column)}"

    def _content_hash(self) -> str:
        """The content hash of source row `s` as it is now (as state.source_sql computes it)."""
        return f"md5({self.sql.doc_expr()} || chr(31) || {self.sql.meta_json()})"

    # -- schema -------------------------------------------------------------------------

    def repair(self, shard: int | None, enqueue: bool) -> Repair:
        """Rows the ledger holds with chunks whose vector the live column lacks (set to
        NULL by hand, a side-table row deleted) are pending again: the next run writes them
        from their reused chunks. O(table): part of `reconcile`."""
        with self.engine.begin() as conn:
            if self.columns(True)[0] not in catalog_columns(conn, self.relation):
                return Repair()
            return Repair(self._pending_again(conn, enqueue, only_missing=True, shard=shard))

    def rewrite_all(self, conn: sa.Connection, enqueue: bool) -> int:
        """After an edit of `write_back:` (another column, row vector or index): every row
        the ledger holds is written to the column again, from its stored chunks."""
        return self._pending_again(conn, enqueue)

    def _pending_again(
        self, conn: sa.Connection, enqueue: bool, only_missing=False, shard: int | None = None
    ) -> int:
        """Every row the ledger holds with chunks (of a shard, or all) is pending again (or,
        `only_missing`, those without a vector in the live column)."""
        in_shard = "AND shard = :shard " if shard is not None else ""
        missing = (
            f"AND NOT EXISTS (SELECT 1 FROM {self.relation} AS w WHERE "
            f"CAST({self._id('w')} AS text) = st.row_id "
            f"AND w.{quote_ident(self.columns(True)[0])} IS NOT NULL)"
            if only_missing
            else ""
        )
        rows = conn.execute(
            sa.text(
                f"UPDATE {STATE_SCHEMA}.row_state AS st SET version = :lost WHERE target = :t "
                f"AND NOT deleted AND chunk_count > 0 AND version <> :lost {in_shard}{missing} "
                "RETURNING shard, row_id"
            ),
            {"t": self.target, "lost": LOST_VERSION, "shard": shard},
        ).fetchall()
        if enqueue:
            ChangeQueue(self.engine, self.target).enqueue(conn, [(r.shard, r.row_id) for r in rows])
        if rows:
            log.info("write_back column lacks %d rows' vectors: pending again", len(rows))
        return len(rows)

    # -- writes -------------------------------------------------------------------------

    def write(self, conn: sa.Connection, rows: RowsToWrite) -> DestinationWrite:
        """Set the row vectors of the written rows (NULL for rows without chunks) and clear
        those of the removed rows. Reports the rows written, and the rows skipped because
        they changed since they were read (their change is queued)."""
        batch, written, removed, live = rows.batch, rows.written, rows.removed, rows.live
        if not (written or removed):
            return DestinationWrite()
        hashes, model_id = rows.hashes, rows.model_id
        chunks = batch.chunked.chunks
        vectors = row_vectors(
            chunks["row_id"].tolist(),
            chunks["chunk_index"].tolist(),
            batch.vectors,
            self.write_back.row_vector,
        )
        columns = self.columns(live)
        id_type = self.id_type(conn)
        done = 0
        if written:
            texts = [_vector_or_none(vectors.get(r)) for r in written]
            done = self._set(conn, written, [hashes[r] for r in written], texts, model_id, columns)
        if removed:
            cleared = ", ".join(f"{quote_ident(c)} = NULL" for c in columns)
            conn.execute(
                sa.text(
                    f"UPDATE {self.relation} AS w SET {cleared} "
                    f"WHERE {self._id('w')} = ANY(CAST(:ids AS {id_type}[])) "
                    f"AND {quote_ident(columns[0])} IS NOT NULL"
                ),
                {"ids": removed},
            )
        return DestinationWrite(
            {
                "write_back_rows_written": done,
                "write_back_rows_changed_since_read": len(written) - done,
            }
        )

    def refusals(self, conn: sa.Connection, rows: RowsToWrite) -> dict[str, RowFailure]:
        """Rows of the source table this role sees but may not update (row-level security
        without an UPDATE policy for it): found by the same UPDATE, rolled back at once,
        only where security applies. Each becomes a failure in the error table, never a
        silently stale vector."""
        if self.side_table or not rows.written or not row_security_applies(conn, self.relation):
            return {}
        id_type = self.id_type(conn)
        first = quote_ident(self.columns(rows.live)[0])
        given = "unnest(CAST(:ids AS text[]), CAST(:hashes AS text[])) AS v(row_id, h)"
        match = f"{self._id('s')} = CAST(v.row_id AS {id_type}) AND {self._content_hash()} = v.h"
        params = {"ids": rows.written, "hashes": [rows.hashes[r] for r in rows.written]}
        probe = conn.begin_nested()
        updatable = set(
            conn.scalars(
                sa.text(
                    f"UPDATE {self.relation} AS s SET {first} = s.{first} FROM {given} "
                    f"WHERE {match} RETURNING v.row_id"
                ),
                params,
            )
        )
        probe.rollback()
        visible = conn.scalars(
            sa.text(f"SELECT v.row_id FROM {self.relation} AS s, {given} WHERE {match}"), params
        )
        role = conn.scalar(sa.text("SELECT current_user"))
        return {
            row: RowFailure(
                rows.hashes[row],
                "refused",
                f"row-level security on {self.relation} lets role {role!r} read this row but "
                "not update it, so its write-back vector cannot be stored. Add an UPDATE "
                f"policy for the role (CREATE POLICY ... ON {self.relation} FOR UPDATE TO "
                f"{quote_ident(role)} USING (...)), or write to a side table (write_back.table)",
            )
            for row in visible
            if row not in updatable
        }

    def _set(self, conn, ids, hashes, texts, model_id, columns) -> int:
        id_type = self.id_type(conn)
        # A row without a vector (empty text) has no model or time either.
        values = ["CAST(v.vec AS vector)"]
        if self.write_back.model_column:
            values.append("CASE WHEN v.vec IS NULL THEN NULL ELSE CAST(:model AS text) END")
        if self.write_back.embedded_at_column:
            values.append("CASE WHEN v.vec IS NULL THEN NULL ELSE CAST(:now AS timestamptz) END")
        params = {
            "ids": ids,
            "hashes": hashes,
            "vecs": texts,
            "model": model_id,
            "now": datetime.now(UTC),
        }
        given = (
            "unnest(CAST(:ids AS text[]), CAST(:hashes AS text[]), CAST(:vecs AS text[])) "
            "AS v(row_id, h, vec)"
        )
        same_content = f"{self._content_hash()} = v.h"
        if not self.side_table:
            assignments = ", ".join(
                f"{quote_ident(c)} = {value}" for c, value in zip(columns, values, strict=True)
            )
            statement = (
                f"UPDATE {self.relation} AS s SET {assignments} FROM {given} "
                f"WHERE {self._id('s')} = CAST(v.row_id AS {id_type}) AND {same_content}"
            )
            return conn.execute(sa.text(statement), params).rowcount
        key = quote_ident(self.spec.id_column)
        names = ", ".join(quote_ident(c) for c in columns)
        updates = ", ".join(f"{quote_ident(c)} = EXCLUDED.{quote_ident(c)}" for c in columns)
        statement = (
            f"INSERT INTO {self.relation} AS w ({key}, {names}) "
            f"SELECT {self._id('s')}, {', '.join(values)} FROM {given} "
            f"JOIN {self.sql.relation} ON {self._id('s')} = CAST(v.row_id AS {id_type}) "
            f"WHERE {same_content} "
            f"ON CONFLICT ({key}) DO UPDATE SET {updates}"
        )
        return conn.execute(sa.text(statement), params).rowcount

    # -- index, reads -------------------------------------------------------------------

    @property
    def qualified_index(self) -> str:
        return f"{quote_ident(self.qualified[0])}.{quote_ident(self.index_name)}"

    def has_index(self, conn: sa.Connection) -> bool:
        return bool(
            conn.scalar(sa.text("SELECT to_regclass(:i) IS NOT NULL"), {"i": self.qualified_index})
        )

    def index_missing(self) -> bool:
        if self.write_back.index != "hnsw":
            return False
        with self.engine.connect() as conn:
            return not self.has_index(conn)

    def build_index(self, live: bool, work_left: Callable[[], bool]) -> DestinationWrite:
        if not self.index_missing() or work_left():
            return DestinationWrite()
        return DestinationWrite({"write_back_index_built": self.create_index(live)})

    def static_metadata(self) -> dict[str, object]:
        return {
            "write_back_table": self.relation,
            "write_back_rows_written": 0,
            "write_back_rows_changed_since_read": 0,
            "write_back_index_built": False,
        }

    def create_index(self, live: bool) -> bool:
        """The HNSW index (cosine) on this generation's column, CONCURRENTLY: the source
        table stays writable while it builds. Once, after a bulk load."""
        if not self.index_missing():
            return False
        column = quote_ident(self.columns(live)[0])
        hnsw = self.spec.pgvector.hnsw
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("SET statement_timeout = 0"))
            # As for the chunk table: the graph in memory (an HNSW build that spills is
            # several times slower) and one parallel worker beside the leader.
            conn.execute(sa.text(f"SET maintenance_work_mem = '{INDEX_BUILD_MEMORY}'"))
            conn.execute(sa.text("SET max_parallel_maintenance_workers = 1"))
            # A build interrupted before leaves an invalid index of the same name.
            conn.execute(sa.text(f"DROP INDEX CONCURRENTLY IF EXISTS {self.qualified_index}"))
            conn.execute(
                sa.text(
                    f"CREATE INDEX CONCURRENTLY {quote_ident(self.index_name)} ON {self.relation} "
                    f"USING hnsw ({column} vector_cosine_ops) "
                    f"WITH (m = {int(hnsw.m)}, ef_construction = {int(hnsw.ef_construction)})"
                )
            )
        return True


def _vector_or_none(vector: np.ndarray | None) -> str | None:
    return None if vector is None else vector_text(vector)
