"""The change queue: row ids that may need work, per target and shard.

Capture triggers append to it in the writing transaction; reconciliation appends what a
full diff found; a run deletes the entries it consumed in the same transaction as its
ledger write, so an entry queued after the run read its work stays for the next run.
Every read here is by (target, shard, id) on one index: its cost follows the queue's
length (the changes), never the source table's.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import sqlalchemy as sa

from embedding_assets.core.sharding import shard_sql
from embedding_assets.state.ddl import STATE_SCHEMA


@dataclass(frozen=True)
class QueueSummary:
    entries: int
    first_id: int
    last_id: int


class ChangeQueue:
    def __init__(self, engine: sa.Engine, target: str):
        self.engine = engine
        self.target = target

    def summary_by_shard(self) -> dict[int, QueueSummary]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT shard, count(*) AS n, min(id) AS first, max(id) AS last
                    FROM {STATE_SCHEMA}.change_queue WHERE target = :t GROUP BY shard"""
                ),
                {"t": self.target},
            ).fetchall()
        return {r.shard: QueueSummary(r.n, r.first, r.last) for r in rows}

    def oldest_by_shard(self) -> dict[int, float]:
        """Per shard with entries: seconds the oldest entry has waited (database clock)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT shard, extract(epoch FROM now() - min(queued_at)) AS age
                    FROM {STATE_SCHEMA}.change_queue WHERE target = :t GROUP BY shard"""
                ),
                {"t": self.target},
            ).fetchall()
        return {r.shard: float(r.age) for r in rows}

    def fresh_shards(self, max_entries: int, max_age_seconds: float) -> set[int]:
        """Shards whose queued entries are few (at most `max_entries`) and all younger than
        `max_age_seconds` (database clock): what the live lane takes, not bulk work."""
        with self.engine.connect() as conn:
            return set(
                conn.scalars(
                    sa.text(
                        f"""SELECT shard FROM {STATE_SCHEMA}.change_queue WHERE target = :t
                        GROUP BY shard HAVING count(*) <= :n
                        AND min(queued_at) > now() - make_interval(secs => :age)"""
                    ),
                    {"t": self.target, "n": max_entries, "age": max_age_seconds},
                )
            )

    def read(self, shard: int, limit: int, newest_first: bool = False) -> list[tuple[int, str]]:
        """The shard's oldest entries (entry id, row id), or its newest (the live lane: a
        fresh change goes before a backlog), `limit` at most."""
        order = "id DESC" if newest_first else "id"
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT id, row_id FROM {STATE_SCHEMA}.change_queue
                    WHERE target = :t AND shard = :s ORDER BY {order} LIMIT :n"""
                ),
                {"t": self.target, "s": shard, "n": limit},
            ).fetchall()
        return [(r.id, r.row_id) for r in rows]

    def acknowledge(self, conn: sa.Connection, entry_ids: Sequence[int]) -> None:
        """Delete consumed entries, in the caller's (ledger write) transaction."""
        if entry_ids:
            conn.execute(
                sa.text(f"DELETE FROM {STATE_SCHEMA}.change_queue WHERE id = ANY(:ids)"),
                {"ids": list(entry_ids)},
            )

    def enqueue(self, conn: sa.Connection, shard_of_rows: Sequence[tuple[int, str]]) -> None:
        """Queue (shard, row id) pairs, e.g. rows to retry or rows reconciliation found."""
        if shard_of_rows:
            conn.execute(
                sa.text(
                    f"""INSERT INTO {STATE_SCHEMA}.change_queue (target, shard, row_id)
                    SELECT :t, u.shard, u.row_id
                    FROM unnest(CAST(:shards AS int[]), CAST(:ids AS text[])) AS u(shard, row_id)"""
                ),
                {
                    "t": self.target,
                    "shards": [s for s, _ in shard_of_rows],
                    "ids": [r for _, r in shard_of_rows],
                },
            )

    def reshard(self, conn: sa.Connection, shards: int) -> None:
        conn.execute(
            sa.text(
                f"UPDATE {STATE_SCHEMA}.change_queue SET shard = {shard_sql('row_id', shards)} "
                "WHERE target = :t"
            ),
            {"t": self.target},
        )

    def clear(self, conn: sa.Connection) -> None:
        conn.execute(
            sa.text(f"DELETE FROM {STATE_SCHEMA}.change_queue WHERE target = :t"),
            {"t": self.target},
        )
