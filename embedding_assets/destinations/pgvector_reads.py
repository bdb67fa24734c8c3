"""Reading a chunk table's vectors: nearest chunks with the source's HNSW settings, samples and
validity counts for the checks."""

import re

import numpy as np
import pandas as pd
import sqlalchemy as sa

from embedding_assets.destinations.pg_vectors import SearchHit, fetch_binary


class ChunkTableSearch:
    """Searches and samples of the chunk table (a mixin of PgVectorDestination: `engine`, `table`,
    `spec`, `table_exists`)."""

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
