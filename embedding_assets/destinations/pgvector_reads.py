"""Reading a chunk table: chunks and vectors by row, shard or hash (reuse, the Qdrant payload),
counts, nearest chunks with the source's HNSW settings, samples and validity for the checks."""

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
import sqlalchemy as sa

from embedding_assets.core.fusion import candidates
from embedding_assets.destinations import lexical
from embedding_assets.destinations.pg_relations import relation_kind
from embedding_assets.destinations.pg_vectors import SearchHit, fetch_binary
from embedding_assets.state.pg_values import payload_expr
from embedding_assets.state.source_sql import quote_ident, quote_literal, quote_table


class ChunkTableReads:
    """Reads of the chunk table (a mixin of PgVectorDestination: `engine`, `table`, `spec`,
    `table_exists`, `_catalog`)."""

    def invalid_vectors(
        self, shard: int | None, dimension: int, rows: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Stored vectors (of the shard, or all; only those of `rows` when given) of the wrong
        length or zero norm (pgvector itself rejects NaN)."""
        if not self.table_exists():
            return {"wrong_dimension": 0, "zero_norm": 0, "checked": 0}
        only = "WHERE shard = :shard" if shard is not None else ""
        if rows is not None:  # the (row_id, chunk_index) index: cost follows the rows
            only = f"{only or 'WHERE true'} AND row_id = ANY(:rows)"
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"""SELECT count(*) FILTER (WHERE vector_dims(embedding) <> :d) AS wrong,
                        count(*) FILTER (WHERE vector_norm(embedding) = 0) AS zero,
                        count(*) AS checked
                    FROM {self.table} {only}"""
                ),
                {"d": dimension, "shard": shard, "rows": list(rows or [])},
            ).one()
        return {"wrong_dimension": row.wrong, "zero_norm": row.zero, "checked": row.checked}

    def sample_chunks(
        self, shard: int | None, size: int, rows: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """A deterministic sample of the shard's (or the table's) chunks with vectors; of
        those of `rows` only, when given (then the cost follows the rows, not the shard)."""
        columns = ["point_id", "row_id", "chunk_text", "embedding"]
        if not self.table_exists():
            return pd.DataFrame(columns=columns)
        only = "WHERE shard = %(shard)s" if shard is not None else ""
        if rows is not None:
            only = f"{only or 'WHERE true'} AND row_id = ANY(%(rows)s)"
        with self.engine.connect() as conn:
            return fetch_binary(
                conn,
                f"""SELECT CAST(point_id AS text) AS point_id, row_id, chunk_text, embedding
                FROM {self.table} {only} ORDER BY md5(CAST(point_id AS text))
                LIMIT %(n)s""",
                {"shard": shard, "n": size, "rows": list(rows or [])},
                columns,
            )

    def search(
        self,
        vector: np.ndarray | None,
        limit: int,
        shard: int | None = None,
        exact: bool = False,
        mode: str = "dense",
        text: str | None = None,
    ) -> list[SearchHit]:
        """Nearest chunks (only the shard's, if given). `dense`: by cosine distance,
        approximate through the HNSW index with the source's `ef_search` and iterative
        scan, or with `exact` every chunk compared (the recall check's ground truth);
        `lexical`: by full-text rank of `text`; `hybrid`: both, fused by reciprocal rank.
        Scores: cosine similarity, `ts_rank_cd`, or the fused RRF score."""
        if not self.table_exists():
            return []
        if mode != "dense":
            self.require_lexical(mode)
        only = "AND t.shard = :shard" if shard is not None else ""
        params = {
            "k": limit,
            "shard": shard,
            "text": text,
            "n": candidates(limit),
            "lw": self.spec.hybrid.lexical_weight,
        }
        if vector is not None:
            params["q"] = np.asarray(vector, dtype=np.float32)
        language = self.spec.hybrid.language
        with self.engine.begin() as conn:
            self._search_settings(conn, exact, limit)
            if mode == "lexical":
                statement = lexical.lexical_sql(self.table, language, only)
            elif mode == "hybrid":
                statement = lexical.hybrid_sql(self.table, language, only)
            else:
                statement = self._dense_sql(only)
            rows = conn.execute(sa.text(statement), params).fetchall()
        return [
            SearchHit(r.row_id, r.chunk_index, float(r.score), r.chunk_text, r.point_id)
            for r in rows
        ]

    def _dense_sql(self, where: str) -> str:
        return f"""WITH hits AS MATERIALIZED (
                SELECT t.point_id, t.row_id, t.chunk_index, t.chunk_text,
                    t.embedding <=> CAST(:q AS vector) AS distance
                FROM {self.table} AS t WHERE true {where}
                ORDER BY t.embedding <=> CAST(:q AS vector) LIMIT :k)
            SELECT CAST(point_id AS text) AS point_id, row_id, chunk_index,
                chunk_text, 1 - distance AS score
            FROM hits ORDER BY distance, point_id"""

    def has_lexical(self) -> bool:
        with self.engine.connect() as conn:
            return lexical.lexical_language(conn, self.table) is not None

    def require_lexical(self, mode: str) -> None:
        if not self.has_lexical():
            raise LookupError(
                f"{mode} search needs the full-text column, which {self.table} lacks "
                f"(hybrid: false for source {self.spec.name!r}, or no sync since it was "
                "turned on): search in dense mode, or set hybrid: true and run a sync"
            )

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

    def metadata_of(self, point_ids: Sequence[str]) -> dict[str, dict]:
        """{point id: its `metadata` as the readers' view has it} for these chunks."""
        if not point_ids:
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT CAST(point_id AS text) AS point_id,
                        jsonb_build_object('row_id', row_id, 'chunk_index', chunk_index)
                        || {self.payload_select(conn).removesuffix(" AS metadata")} AS metadata
                    FROM {self.table} WHERE point_id = ANY(CAST(:ids AS uuid[]))"""
                ),
                {"ids": list(point_ids)},
            ).fetchall()
        return {r.point_id: r.metadata for r in rows}

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
