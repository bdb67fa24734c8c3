"""Vectors a run computed but has not stored yet: the progress of a long embedding step.

A run with many chunks to embed (a 5 MB row is ~9,000 chunks, minutes of compute) saves
each finished piece here, committed at once. If the run is interrupted, the next run of
the shard finds those vectors by chunk hash and embeds only the rest. The store step
removes the entries it wrote to pgvector; entries of a model the target no longer uses
are never read (the model is part of the key) and are dropped with `prune`.

Without a chunk table (a column-only source) the cache keeps every chunk vector, so an
unchanged chunk is still copied, not embedded again: `keep_rows` records which chunks each
row has (`row_chunks`) and removes the vectors no row uses any more.
"""

from collections.abc import Sequence

import numpy as np
import sqlalchemy as sa

from embedding_assets.destinations.pg_vectors import fetch_binary, vector_text
from embedding_assets.state.ddl import STATE_SCHEMA


class VectorCache:
    def __init__(self, engine: sa.Engine, target: str, model_id: str):
        self.engine = engine
        self.target = target
        self.model_id = model_id

    def save(self, chunk_hashes: Sequence[str], vectors: np.ndarray) -> None:
        """Keep these vectors (committed now, whatever happens to the run)."""
        if not len(chunk_hashes):
            return
        with self.engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()
            try:
                with cursor.copy(
                    f"COPY {STATE_SCHEMA}.vector_cache (target, model, chunk_hash, embedding) "
                    "FROM STDIN WITH (FORMAT BINARY)"
                ) as copy:
                    copy.set_types(["text", "text", "text", "vector"])
                    for chunk_hash, vector in zip(chunk_hashes, vectors, strict=True):
                        copy.write_row([self.target, self.model_id, chunk_hash, vector])
            finally:
                cursor.close()

    def load(self, chunk_hashes: Sequence[str]) -> dict[str, np.ndarray]:
        if not chunk_hashes:
            return {}
        with self.engine.connect() as conn:
            found = fetch_binary(
                conn,
                f"""SELECT DISTINCT ON (chunk_hash) chunk_hash, embedding
                FROM {STATE_SCHEMA}.vector_cache WHERE target = %(t)s AND model = %(m)s
                AND chunk_hash = ANY(%(hashes)s)""",
                {"t": self.target, "m": self.model_id, "hashes": list(set(chunk_hashes))},
                ["chunk_hash", "embedding"],
            )
        return dict(zip(found["chunk_hash"], found["embedding"], strict=True))

    def forget(self, conn: sa.Connection, chunk_hashes: Sequence[str]) -> None:
        """In the store's transaction: these vectors are in pgvector now."""
        if chunk_hashes:
            conn.execute(
                sa.text(
                    f"""DELETE FROM {STATE_SCHEMA}.vector_cache WHERE target = :t
                    AND chunk_hash = ANY(:hashes)"""
                ),
                {"t": self.target, "hashes": list(set(chunk_hashes))},
            )

    def keep_rows(
        self,
        conn: sa.Connection,
        replaced: Sequence[str],
        chunks: Sequence[tuple[str, int, str]],
        vectors: np.ndarray,
    ) -> None:
        """In the store's transaction: the rows `replaced` (written or removed) now have
        exactly `chunks` (row id, chunk index, chunk hash; vectors aligned), and the
        vectors of their old chunks that no row uses any more are removed."""
        if not replaced:
            return
        t = {"t": self.target}
        old = conn.execute(
            sa.text(
                f"DELETE FROM {STATE_SCHEMA}.row_chunks WHERE target = :t "
                "AND row_id = ANY(:ids) RETURNING chunk_hash"
            ),
            {**t, "ids": list(replaced)},
        ).scalars()
        old_hashes = list(set(old))
        if chunks:
            ids, indexes, hashes = (list(column) for column in zip(*chunks, strict=True))
            conn.execute(
                sa.text(
                    f"INSERT INTO {STATE_SCHEMA}.row_chunks (target, row_id, chunk_index, "
                    "chunk_hash) SELECT :t, r, i, h FROM unnest(CAST(:ids AS text[]), "
                    "CAST(:indexes AS int[]), CAST(:hashes AS text[])) AS u(r, i, h)"
                ),
                {**t, "ids": ids, "indexes": indexes, "hashes": hashes},
            )
            first = {h: position for position, h in reversed(list(enumerate(hashes)))}
            conn.execute(
                sa.text(
                    f"INSERT INTO {STATE_SCHEMA}.vector_cache (target, model, chunk_hash, "
                    "embedding) SELECT :t, :m, h, CAST(v AS vector) FROM unnest("
                    "CAST(:hashes AS text[]), CAST(:vectors AS text[])) AS u(h, v) "
                    "ON CONFLICT (target, model, chunk_hash) DO NOTHING"
                ),
                {
                    **t,
                    "m": self.model_id,
                    "hashes": list(first),
                    "vectors": [vector_text(vectors[p]) for p in first.values()],
                },
            )
        if old_hashes:
            conn.execute(
                sa.text(
                    f"DELETE FROM {STATE_SCHEMA}.vector_cache AS c WHERE c.target = :t "
                    "AND c.chunk_hash = ANY(:old) AND NOT EXISTS (SELECT 1 FROM "
                    f"{STATE_SCHEMA}.row_chunks AS r WHERE r.target = c.target "
                    "AND r.chunk_hash = c.chunk_hash)"
                ),
                {**t, "old": old_hashes},
            )

    def keep_leaving(
        self,
        conn: sa.Connection,
        chunk_table: str,
        leaving_rows_sql: str,
        params: dict,
        hours: float,
    ) -> int:
        """In the transaction that queues an eligibility edit: the vectors of the rows it
        removes (`leaving_rows_sql` selects their ids) are kept for `hours`, so a row that
        comes back (the edit undone) is copied, not embedded."""
        return conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.vector_cache
                    (target, model, chunk_hash, embedding, kept_until)
                SELECT DISTINCT ON (c.chunk_hash) :cache_target, :cache_model, c.chunk_hash,
                    c.embedding, now() + make_interval(secs => :keep_seconds)
                FROM {chunk_table} AS c
                WHERE c.model = :cache_model AND c.row_id IN ({leaving_rows_sql})
                ON CONFLICT (target, model, chunk_hash) DO UPDATE
                    SET kept_until = EXCLUDED.kept_until
                    WHERE {STATE_SCHEMA}.vector_cache.kept_until IS NOT NULL"""
            ),
            {
                **params,
                "cache_target": self.target,
                "cache_model": self.model_id,
                "keep_seconds": hours * 3600,
            },
        ).rowcount

    def prune(self) -> int:
        """Drop entries of other models (after a model change they are never read) and the
        kept vectors of rows that left, once their time is up."""
        with self.engine.begin() as conn:
            return conn.execute(
                sa.text(
                    f"DELETE FROM {STATE_SCHEMA}.vector_cache WHERE target = :t "
                    "AND (model <> :m OR kept_until < now())"
                ),
                {"t": self.target, "m": self.model_id},
            ).rowcount
