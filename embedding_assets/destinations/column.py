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
import json
import logging
from datetime import UTC, datetime

import numpy as np
import sqlalchemy as sa

from embedding_assets.core.delta import EmbeddedRows
from embedding_assets.core.row_vectors import row_vectors
from embedding_assets.destinations.audit import LOST_VERSION
from embedding_assets.destinations.pgvector import (
    INDEX_BUILD_MEMORY,
    POSTGRES_NAME_LIMIT,
    vector_text,
)
from embedding_assets.settings import SourceSpec, WriteBackSpec
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.source_sql import (
    SourceSql,
    catalog_columns,
    column_types,
    quote_ident,
    quote_table,
)

log = logging.getLogger(__name__)

INSUFFICIENT_PRIVILEGE = "42501"
LOCK_NOT_AVAILABLE = "55P03"
DDL_LOCK_TIMEOUT = "5s"


class WriteBackError(RuntimeError):
    """The write-back column cannot be created or written; the message holds the SQL to run."""


def generation_column(name: str, number: int, live: bool) -> str:
    return name if live else f"{name}__g{number}"


class ColumnDestination:
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

    def ddl(self, dimension: int, live: bool, conn: sa.Connection) -> list[str]:
        """What creates this generation's columns (and the side table), for us or a DBA."""
        types = {self.columns(live)[0]: f"vector({int(dimension)})"}
        if self.write_back.model_column:
            types[generation_column(self.write_back.model_column, self.number, live)] = "text"
        if self.write_back.embedded_at_column:
            at = generation_column(self.write_back.embedded_at_column, self.number, live)
            types[at] = "timestamptz"
        statements = []
        if self.side_table:
            schema = quote_ident(self.qualified[0])
            statements.append(f"CREATE SCHEMA IF NOT EXISTS {schema}")
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.relation} ("
                f"{quote_ident(self.spec.id_column)} {self.id_type(conn)} PRIMARY KEY)"
            )
        statements += [
            f"ALTER TABLE {self.relation} ADD COLUMN IF NOT EXISTS {quote_ident(c)} {t}"
            for c, t in types.items()
        ]
        return statements

    def ensure(self, conn: sa.Connection, dimension: int, live: bool, enqueue: bool) -> int:
        """Create this generation's columns if missing (a role that may not alter the table
        gets the exact SQL for a DBA). A column with no vector yet while the ledger holds
        embedded rows (new, made by a DBA, or dropped and added again) is filled: those rows
        are pending again, queued unless the feed is the diff, and their chunks are reused,
        so nothing is embedded twice. Returns the rows made pending."""
        if self.ready == (dimension, live):
            return 0
        existing = catalog_columns(conn, self.relation)
        if not all(c in existing for c in self.columns(live)):
            statements = self.ddl(dimension, live, conn)
            try:
                with conn.begin_nested():
                    # ALTER TABLE queues behind the application's open transactions, and
                    # its queries queue behind it: wait briefly, then fail (retried later).
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
                    for statement in statements:
                        conn.execute(sa.text(statement))
            except sa.exc.DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state == LOCK_NOT_AVAILABLE:
                    raise WriteBackError(
                        f"could not add the write-back column to {self.relation} within "
                        f"{DDL_LOCK_TIMEOUT}: long transactions hold the table. The run is "
                        "retried; or add it yourself: " + "; ".join(statements)
                    ) from exc
                if state != INSUFFICIENT_PRIVILEGE:
                    raise
                raise WriteBackError(self._privilege_message(conn, statements, live)) from exc
        self._require_shape(conn, live, dimension)
        refilled = self._pending_again(conn, enqueue) if self._empty(conn, live) else 0
        self.ready = (dimension, live)
        return refilled

    def _empty(self, conn: sa.Connection, live: bool) -> bool:
        column = quote_ident(self.columns(live)[0])
        return not conn.scalar(
            sa.text(f"SELECT EXISTS (SELECT 1 FROM {self.relation} WHERE {column} IS NOT NULL)")
        )

    def _require_shape(self, conn: sa.Connection, live: bool, dimension: int) -> None:
        vector = self.columns(live)[0]
        declared = conn.scalar(
            sa.text(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = to_regclass(:rel) AND attname = :col AND NOT attisdropped"
            ),
            {"rel": self.relation, "col": vector},
        )
        if declared != f"vector({int(dimension)})":
            raise WriteBackError(
                f"write_back column {vector!r} of {self.relation} is {declared}, but "
                f"{self.spec.name!r} writes vector({int(dimension)}) vectors: rename or drop "
                "that column, or name another in write_back.column"
            )
        for column in self.columns(live):
            allowed = conn.scalar(
                sa.text("SELECT has_column_privilege(:rel, :col, 'UPDATE')"),
                {"rel": self.relation, "col": column},
            )
            if not allowed:
                names = ", ".join(quote_ident(c) for c in self.columns(live))
                role = quote_ident(conn.scalar(sa.text("SELECT current_user")))
                raise WriteBackError(
                    f"this role may not write column {column!r} of {self.relation}. Ask a DBA "
                    f"to run: GRANT UPDATE ({names}) ON {self.relation} TO {role};"
                )

    def _privilege_message(self, conn: sa.Connection, statements: list[str], live: bool) -> str:
        role = conn.scalar(sa.text("SELECT current_user"))
        grant = (
            f"GRANT SELECT, INSERT, UPDATE ON {self.relation} TO {quote_ident(role)};"
            if self.side_table
            else f"GRANT UPDATE ({', '.join(quote_ident(c) for c in self.columns(live))}) "
            f"ON {self.relation} TO {quote_ident(role)};"
        )
        sql = ";\n".join(statements) + ";\n" + grant
        return (
            f"write_back for source {self.spec.name!r}: role {role!r} may not create the "
            f"{'side table' if self.side_table else 'vector column'} in {self.relation}. "
            f"Ask a DBA to run:\n{sql}\nor set write_back.table to a side table this role "
            "may create."
        )

    def repair_missing(self, enqueue: bool) -> int:
        """Rows the ledger holds with chunks whose vector the live column lacks (set to
        NULL by hand, a side-table row deleted) are pending again: the next run writes them
        from their reused chunks. O(table): part of `reconcile`. Returns the rows marked."""
        with self.engine.begin() as conn:
            if self.columns(True)[0] not in catalog_columns(conn, self.relation):
                return 0
            return self._pending_again(conn, enqueue, only_missing=True)

    def _pending_again(self, conn: sa.Connection, enqueue: bool, only_missing=False) -> int:
        """Every row the ledger holds with chunks is pending again (or, `only_missing`,
        those without a vector in the live column)."""
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
                f"AND NOT deleted AND chunk_count > 0 AND version <> :lost {missing} "
                "RETURNING shard, row_id"
            ),
            {"t": self.target, "lost": LOST_VERSION},
        ).fetchall()
        if enqueue:
            ChangeQueue(self.engine, self.target).enqueue(conn, [(r.shard, r.row_id) for r in rows])
        if rows:
            log.info("write_back column lacks %d rows' vectors: pending again", len(rows))
        return len(rows)

    # -- writes -------------------------------------------------------------------------

    def write(
        self,
        conn: sa.Connection,
        batch: EmbeddedRows,
        written: list[str],
        removed: list[str],
        hashes: dict[str, str],
        model_id: str,
        live: bool,
    ) -> tuple[int, int]:
        """Set the row vectors of `written` rows (NULL for rows without chunks) and clear
        those of `removed` rows. Returns (rows written, rows skipped because they changed
        since they were read)."""
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
        return done, len(written) - done

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

    def build_index(self, live: bool) -> bool:
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

    def count(self, live: bool = True) -> int:
        """Rows with a vector in this generation's column (0 before the column exists)."""
        column = self.columns(live)[0]
        with self.engine.connect() as conn:
            if column not in catalog_columns(conn, self.relation):
                return 0
            return int(
                conn.scalar(
                    sa.text(
                        f"SELECT count(*) FROM {self.relation} "
                        f"WHERE {quote_ident(column)} IS NOT NULL"
                    )
                )
            )

    def _held_rows(self, shard: int | None) -> tuple[str, dict]:
        """FROM clause: this generation's column rows that the ledger holds (of a shard)."""
        only = "AND st.shard = :shard" if shard is not None else ""
        return (
            f"{self.relation} AS w JOIN {STATE_SCHEMA}.row_state AS st ON st.target = :t "
            f"AND NOT st.deleted AND st.row_id = CAST({self._id('w')} AS text) {only}",
            {"t": self.target, "shard": shard},
        )

    def invalid_vectors(self, shard: int | None, live: bool) -> dict[str, int]:
        """Rows the ledger holds with chunks but no vector, and zero vectors (the column's
        type fixes the dimension; Postgres rejects NaN)."""
        column = f"w.{quote_ident(self.columns(live)[0])}"
        held, params = self._held_rows(shard)
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"SELECT count(*) FILTER (WHERE {column} IS NULL AND st.chunk_count > 0) "
                    f"AS missing, count(*) FILTER (WHERE vector_norm({column}) = 0) AS zero "
                    f"FROM {held}"
                ),
                params,
            ).one()
        return {"missing_vectors": int(row.missing), "zero_norm": int(row.zero)}

    def sample(self, shard: int | None, count: int, live: bool) -> list[tuple[str, np.ndarray]]:
        """Up to `count` (row id, vector) of rows with a vector, spread over the shard."""
        column = f"w.{quote_ident(self.columns(live)[0])}"
        held, params = self._held_rows(shard)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"SELECT st.row_id, CAST({column} AS text) AS v FROM {held} "
                    f"WHERE {column} IS NOT NULL ORDER BY md5(st.row_id) LIMIT :n"
                ),
                {**params, "n": count},
            ).fetchall()
        return [(r.row_id, np.array(json.loads(r.v), dtype=np.float32)) for r in rows]

    def self_retrieval_misses(
        self, shard: int | None, count: int, k: int, live: bool = True
    ) -> list[str]:
        """Sampled rows whose own vector does not find them in the top `k` of the column."""
        missing = []
        for row_id, vector in self.sample(shard, count, live):
            hits = self.search(vector, k, live=live)
            if not any(h["row_id"] == row_id for h in hits):
                missing.append(row_id)
        return missing

    def search(
        self, vector: np.ndarray, limit: int, exact: bool = False, live: bool = True
    ) -> list[dict]:
        """Nearest rows by cosine distance (on the live generation's column unless `live`
        is False): row id, score, the row's text."""
        name = quote_ident(self.columns(live)[0])
        if self.side_table:
            on = f"{self._id('s')} = {self._id('w')}"
            joined = f"{self.relation} AS w JOIN {self.sql.relation} ON {on}"
            column = f"w.{name}"
        else:
            joined, column = f"{self.relation} AS s", f"s.{name}"
        with self.engine.begin() as conn:
            if exact:
                conn.execute(sa.text("SELECT set_config('enable_indexscan', 'off', true)"))
            else:
                ef = max(int(self.spec.pgvector.hnsw.ef_search), limit)
                conn.execute(
                    sa.text("SELECT set_config('hnsw.ef_search', :ef, true)"), {"ef": str(ef)}
                )
            rows = conn.execute(
                sa.text(
                    f"SELECT CAST({self._id('s')} AS text) AS row_id, "
                    f"1 - ({column} <=> CAST(:q AS vector)) AS score, "
                    f"{self.sql.doc_expr()} AS text "
                    f"FROM {joined} WHERE {column} IS NOT NULL "
                    f"ORDER BY {column} <=> CAST(:q AS vector) LIMIT :k"
                ),
                {"q": vector_text(np.asarray(vector, dtype=np.float32)), "k": limit},
            ).fetchall()
        return [{"row_id": r.row_id, "score": float(r.score), "text": r.text} for r in rows]


def _vector_or_none(vector: np.ndarray | None) -> str | None:
    return None if vector is None else vector_text(vector)


def swap_columns(
    conn: sa.Connection, spec: SourceSpec, old_live: int | None, new_live: int
) -> None:
    """Promotion, in its transaction: the old live generation's columns take their
    `__g<old>` names and the new one's lose their `__g<new>` suffix."""
    if spec.write_back is None:
        return
    relation = quote_table(spec.write_back_table)
    # A rename waits for the application's transactions on the table: briefly, else the
    # promotion fails whole and is tried again after the next write.
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
    existing = catalog_columns(conn, relation)
    for name in spec.write_back.columns:
        shadow = generation_column(name, new_live, live=False)
        if shadow not in existing:
            continue  # this generation never wrote the column (write_back added later)
        if name in existing:
            if old_live is None:
                raise WriteBackError(
                    f"{relation} has a column {name!r} that no live generation of "
                    f"{spec.name!r} owns; rename or drop it, then promote again"
                )
            retired = quote_ident(generation_column(name, old_live, live=False))
            conn.execute(
                sa.text(f"ALTER TABLE {relation} RENAME COLUMN {quote_ident(name)} TO {retired}")
            )
        conn.execute(
            sa.text(
                f"ALTER TABLE {relation} RENAME COLUMN {quote_ident(shadow)} TO {quote_ident(name)}"
            )
        )


def drop_columns(conn: sa.Connection, spec: SourceSpec, number: int) -> None:
    """A dropped generation's shadow columns go with it."""
    if spec.write_back is None:
        return
    relation = quote_table(spec.write_back_table)
    for name in spec.write_back.columns:
        shadow = quote_ident(generation_column(name, number, live=False))
        conn.execute(sa.text(f"ALTER TABLE {relation} DROP COLUMN IF EXISTS {shadow}"))
