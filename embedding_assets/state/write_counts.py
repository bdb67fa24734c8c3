"""Cumulative counts of what the store step did, per generation and shard: the counters of
/metrics (ops.metrics), which must survive the short-lived run processes that do the writes.
Added to in the store's own transaction, so they count exactly what committed."""

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA


class WriteCounts:
    def __init__(self, target: str):
        self.target = target

    def add(
        self, conn: sa.Connection, shard: int, embedded: int, deleted: int, failed: int, dead: int
    ) -> None:
        if not (embedded or deleted or failed or dead):
            return
        conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.write_counts AS w (target, shard, rows_embedded,
                    rows_deleted, rows_failed, rows_dead, last_write_at)
                VALUES (:t, :shard, :embedded, :deleted, :failed, :dead, now())
                ON CONFLICT (target, shard) DO UPDATE SET
                    rows_embedded = w.rows_embedded + EXCLUDED.rows_embedded,
                    rows_deleted = w.rows_deleted + EXCLUDED.rows_deleted,
                    rows_failed = w.rows_failed + EXCLUDED.rows_failed,
                    rows_dead = w.rows_dead + EXCLUDED.rows_dead,
                    last_write_at = now()"""
            ),
            {
                "t": self.target,
                "shard": shard,
                "embedded": embedded,
                "deleted": deleted,
                "failed": failed,
                "dead": dead,
            },
        )
