"""The per-row error table: rows the embedder failed on, and when to try them again.

A failed row is recorded in the same transaction that stores the rest of its batch, and its
change-feed entries are consumed with the others, so a failing row never sits at the head
of its shard's work. While it waits for its retry (or once it is dead), the diff holds the
failed content back: it is not pending, and `max_rows_per_run` counts only rows that can be
done now. When the retry time comes, `requeue_due` puts the row back in the change queue
(a diff feed sees it pending again by itself); content that changed since the failure is
not held at all. A successful write or a delete clears the record.

The wait after the n-th failure is `first_wait_seconds * 2**(n-1)`, at most
`max_wait_seconds`; the `max_attempts`-th failure of the same content makes the row dead.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from embedding_assets.config.sources import RetrySpec
from embedding_assets.core.delta import RowFailure
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.queue import ChangeQueue

MESSAGE_CHARS = 1000
# Failures that the same content would meet again: dead at once, until the content changes
# (or `errors replay`, after the cause is fixed).
PERMANENT_KINDS = ("unstorable", "duplicate_id")


def held(error: str, content_hash: str) -> str:
    """SQL: the row's content is the failed one and must wait (or is dead)."""
    return (
        f"({error}.content_hash = {content_hash} "
        f"AND ({error}.state = 'dead' OR {error}.next_retry_at > now()))"
    )


@dataclass(frozen=True)
class RowError:
    row_id: str
    shard: int
    content_hash: str
    kind: str
    message: str
    attempts: int
    first_failed_at: datetime
    last_failed_at: datetime
    next_retry_at: datetime | None
    state: str


class RowErrors:
    def __init__(self, engine: sa.Engine, target: str, policy: RetrySpec, queue: ChangeQueue):
        self.engine = engine
        self.target = target
        self.policy = policy
        self.queue = queue

    # -- writes (inside the ledger write's transaction) ---------------------------------

    def record(self, conn: sa.Connection, shard: int, failures: dict[str, RowFailure]) -> int:
        """Count one more failure of each row's content (a new content starts at 1), and
        set when to retry it or mark it dead. Returns how many of them are dead now."""
        if not failures:
            return 0
        ids = list(failures)
        conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.row_errors AS e
                    (target, row_id, shard, content_hash, kind, message, attempts,
                     first_failed_at, last_failed_at, state)
                SELECT :t, u.row_id, :shard, u.hash, u.kind, u.message, 1, now(), now(),
                       'retrying'
                FROM unnest(CAST(:ids AS text[]), CAST(:hashes AS text[]),
                            CAST(:kinds AS text[]), CAST(:messages AS text[]))
                    AS u(row_id, hash, kind, message)
                ON CONFLICT (target, row_id) DO UPDATE SET
                    shard = EXCLUDED.shard, kind = EXCLUDED.kind, message = EXCLUDED.message,
                    last_failed_at = EXCLUDED.last_failed_at,
                    attempts = CASE WHEN e.content_hash = EXCLUDED.content_hash
                               THEN e.attempts + 1 ELSE 1 END,
                    first_failed_at = CASE WHEN e.content_hash = EXCLUDED.content_hash
                               THEN e.first_failed_at ELSE EXCLUDED.first_failed_at END,
                    content_hash = EXCLUDED.content_hash"""
            ),
            {
                "t": self.target,
                "shard": shard,
                "ids": ids,
                "hashes": [failures[r].content_hash for r in ids],
                "kinds": [failures[r].kind for r in ids],
                "messages": [failures[r].message[:MESSAGE_CHARS] for r in ids],
            },
        )
        states = conn.scalars(
            sa.text(
                f"""UPDATE {STATE_SCHEMA}.row_errors SET
                    state = CASE WHEN attempts >= :max OR kind = ANY(:permanent) THEN 'dead'
                        ELSE 'retrying' END,
                    next_retry_at = CASE WHEN attempts >= :max OR kind = ANY(:permanent)
                        THEN NULL
                        ELSE last_failed_at + make_interval(secs => least(
                            :first * power(2, attempts - 1), :cap)) END
                WHERE target = :t AND row_id = ANY(:ids) RETURNING state"""
            ),
            {
                "t": self.target,
                "ids": ids,
                "max": self.policy.max_attempts,
                "permanent": list(PERMANENT_KINDS),
                "first": self.policy.first_wait_seconds,
                "cap": self.policy.max_wait_seconds,
            },
        ).all()
        return sum(state == "dead" for state in states)

    def clear(self, conn: sa.Connection, ids: Sequence[str]) -> None:
        """Rows written or deleted: whatever failed before is resolved."""
        if ids:
            conn.execute(
                sa.text(
                    f"DELETE FROM {STATE_SCHEMA}.row_errors "
                    "WHERE target = :t AND row_id = ANY(:ids)"
                ),
                {"t": self.target, "ids": list(ids)},
            )

    def requeue_due(self) -> int:
        """Queue the rows whose retry time has come (once: their retry time is cleared until
        they fail again). Reads the partial index of waiting rows only."""
        with self.engine.begin() as conn:
            due = conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.row_errors SET next_retry_at = NULL
                    WHERE target = :t AND next_retry_at IS NOT NULL AND next_retry_at <= now()
                    RETURNING shard, row_id"""
                ),
                {"t": self.target},
            ).fetchall()
            self.queue.enqueue(conn, sorted((r.shard, r.row_id) for r in due))
        return len(due)

    def replay(
        self, row_ids: Sequence[str] | None = None, dead_only: bool = False, enqueue: bool = True
    ) -> int:
        """Forget the failures of the given rows (or every dead row) and make them pending
        now; returns how many rows."""
        only = "AND row_id = ANY(:ids)" if row_ids is not None else ""
        dead = "AND state = 'dead'" if dead_only else ""
        with self.engine.begin() as conn:
            replayed = conn.execute(
                sa.text(
                    f"""DELETE FROM {STATE_SCHEMA}.row_errors WHERE target = :t {only} {dead}
                    RETURNING shard, row_id"""
                ),
                {"t": self.target, "ids": list(row_ids or [])},
            ).fetchall()
            if enqueue:
                self.queue.enqueue(conn, sorted((r.shard, r.row_id) for r in replayed))
        return len(replayed)

    # -- reads --------------------------------------------------------------------------

    def ids_of_kind(self, kind: str, limit: int = 20) -> list[str]:
        with self.engine.connect() as conn:
            return list(
                conn.scalars(
                    sa.text(
                        f"""SELECT row_id FROM {STATE_SCHEMA}.row_errors
                        WHERE target = :t AND kind = :k ORDER BY row_id LIMIT :n"""
                    ),
                    {"t": self.target, "k": kind, "n": limit},
                )
            )

    def list(self, limit: int = 1000, dead_only: bool = False) -> list[RowError]:
        dead = "AND state = 'dead'" if dead_only else ""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT row_id, shard, content_hash, kind, message, attempts,
                        first_failed_at, last_failed_at, next_retry_at, state
                    FROM {STATE_SCHEMA}.row_errors WHERE target = :t {dead}
                    ORDER BY state, last_failed_at DESC, row_id LIMIT :n"""
                ),
                {"t": self.target, "n": limit},
            ).fetchall()
        return [RowError(*row) for row in rows]

    def counts_by_shard(self) -> dict[int, tuple[int, int]]:
        """Per shard: (rows waiting to be retried, dead rows)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    f"""SELECT shard, count(*) FILTER (WHERE state = 'retrying') AS failed,
                        count(*) FILTER (WHERE state = 'dead') AS dead
                    FROM {STATE_SCHEMA}.row_errors WHERE target = :t GROUP BY shard"""
                ),
                {"t": self.target},
            ).fetchall()
        return {r.shard: (r.failed, r.dead) for r in rows}
