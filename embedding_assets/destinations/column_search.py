"""Reading the write-back column: rows holding a vector, invalid vectors, samples for the checks,
and the nearest rows to a query."""

import json

import numpy as np
import sqlalchemy as sa

from embedding_assets.destinations.pg_vectors import vector_text
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.source_sql import (
    catalog_columns,
    quote_ident,
)


class ColumnReads:
    """Counts, samples and searches of the column (a mixin of ColumnDestination)."""

    def count(self, shard: int | None = None, live: bool = True) -> int:
        """Rows with a vector in this generation's column, of the shard's rows the ledger
        holds or of the whole table (0 before the column exists)."""
        column = self.columns(live)[0]
        with self.engine.connect() as conn:
            if column not in catalog_columns(conn, self.relation):
                return 0
            if shard is None:
                source, params = self.relation, {}
            else:
                source, params = self._held_rows(shard)
            return int(
                conn.scalar(
                    sa.text(
                        f"SELECT count(*) FROM {source} WHERE {quote_ident(column)} IS NOT NULL"
                    ),
                    params,
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
