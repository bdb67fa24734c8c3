"""The HNSW index of a chunk table: built once after a bulk load, dropped before a write that
rewrites most of the table."""

import os

import sqlalchemy as sa

from embedding_assets.state.ddl import shard_lock
from embedding_assets.state.source_sql import (
    quote_ident,
)

# A write of more chunks than this share of the table (and at least REBUILD_MIN) rebuilds
# the HNSW index afterwards instead of maintaining it.
REBUILD_SHARE = 0.5


REBUILD_MIN_CHUNKS = 20_000


# maintenance_work_mem of the one HNSW build: the build is many times faster while the graph
# fits (1M 384-d vectors need about 2-3 GB).
INDEX_BUILD_MEMORY = os.environ.get("EMBEDDING_ASSETS_INDEX_BUILD_MEMORY", "3GB")


class ChunkTableIndex:
    """The chunk table's HNSW index (a mixin of PgVectorDestination: `table`, `spec`, `target`,
    `hnsw_index`)."""

    def has_index(self, conn: sa.Connection) -> bool:
        schema, _ = self.spec.pg_table
        return bool(
            conn.scalar(
                sa.text("SELECT to_regclass(:i) IS NOT NULL"),
                {"i": f"{quote_ident(schema)}.{self.hnsw_index}"},
            )
        )

    def create_index(self, conn: sa.Connection) -> bool:
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
