"""Change feeds: which shards have work, and the candidate rows of one shard.

One implementation per capture mode (`change_capture` in sources.yaml):

- `TriggerFeed`: capture triggers fill the change queue; a shard's work is its queued ids,
  looked up in the source by primary key. O(changes) per tick and per run.
- `WatermarkFeed`: an indexed `watermark_column` (e.g. updated_at); a shard's work is the
  rows past its watermark, plus queued ids (retries, reconciliation). Deletes are found by
  reconciliation.
- `DiffFeed`: the full comparison of the source with the ledger, for `query:` sources and
  small tables. O(table) per tick and per run.

Every feed hands its candidates to the diff against the ledger, so a candidate that turns
out current costs a lookup, never a write, and the feed never decides correctness alone.
The queue feeds acknowledge consumed entries in the same transaction as the ledger write.
"""

import logging
from typing import Protocol

import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import PendingRows
from embedding_assets.state.ddl import STATE_SCHEMA, ddl_lock, execute_script
from embedding_assets.state.diff import SourceDiff
from embedding_assets.state.errors import RowErrors
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.source_sql import column_types, quote_table
from embedding_assets.state.triggers import (
    CaptureTriggers,
    table_columns,
)

log = logging.getLogger(__name__)


class ChangeFeed(Protocol):
    mode: str
    queue: ChangeQueue  # read by the trigger and watermark feeds; a diff feed clears it
    errors: RowErrors  # rows that failed, with their retry times

    def ensure(self) -> None:
        """Set capture up (install triggers, seed the queue); idempotent, cached."""

    def pending(self, shard: int, limit: int) -> PendingRows:
        """At most `limit` rows of the shard that need work, with what was consumed."""

    def work(self, ensure: bool = True) -> dict[int, tuple[int, str | None]]:
        """Per shard with work: (pending rows, or an estimate; a fingerprint). Cheap.
        `ensure=False` (read-only callers: status) installs nothing and requeues nothing."""

    def acknowledge(self, conn: sa.Connection, pending: PendingRows) -> None:
        """In the ledger write's transaction: consume `pending` (rows that failed are in
        the error table, which retries them)."""

    def reconcile(self) -> int:
        """Queue what a full diff finds pending; returns how many rows."""

    def catch_up(self) -> int:
        """Queue what a full diff finds pending, holding writers where that matters."""


def capture_row(conn: sa.Connection, target: str):
    return conn.execute(
        sa.text(f"SELECT mode, signature FROM {STATE_SCHEMA}.capture WHERE target = :t"),
        {"t": target},
    ).one_or_none()


def record_capture(conn: sa.Connection, target: str, mode: str, signature: str | None) -> None:
    conn.execute(
        sa.text(
            f"""INSERT INTO {STATE_SCHEMA}.capture (target, mode, signature, installed_at)
            VALUES (:t, :m, :s, now()) ON CONFLICT (target) DO UPDATE SET mode = EXCLUDED.mode,
                signature = EXCLUDED.signature, installed_at = EXCLUDED.installed_at"""
        ),
        {"t": target, "m": mode, "s": signature},
    )


class BaseFeed:
    mode = ""

    def __init__(
        self,
        engine: sa.Engine,
        spec: SourceSpec,
        diff: SourceDiff,
        queue: ChangeQueue,
        watched_extra: tuple[str, ...] = (),
    ):
        self.engine = engine
        self.spec = spec
        self.diff = diff
        self.queue = queue
        self.watched_extra = watched_extra  # other generations' template columns
        self.target = diff.target
        self.errors = RowErrors(engine, self.target, spec.retries, queue)
        self._ensured = False


class QueueFeed(BaseFeed):
    """What the trigger and watermark feeds share: the queue, reconcile, acknowledgement."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._id_type: str | None = None

    def id_type(self) -> str:
        if self._id_type is None:
            with self.engine.connect() as conn:
                probe = self.diff.sql.column_types_probe([self.spec.id_column])
                self._id_type = column_types(conn, probe)[0]
        return self._id_type

    def reconcile(self) -> int:
        self.ensure()
        with self.engine.begin() as conn:
            found = self.diff.enqueue_pending(conn)
            conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.capture SET reconciled_at = now(),
                        reconcile_found = :n WHERE target = :t"""
                ),
                {"n": found, "t": self.target},
            )
        return found

    def catch_up(self) -> int:
        """Queue what a full diff finds pending, for a generation the feed did not fill for
        a while (a rollback). Trigger capture holds writers meanwhile, so no change falls
        between the diff and the trigger filling the generation again."""
        self.ensure()
        with self.engine.begin() as conn:
            if self.mode == "trigger":
                hold_writers(conn, quote_table(split_qualified(self.spec.table or "")))
            return self.diff.enqueue_pending(conn)

    def _queued_pending(
        self, shard: int, limit: int, newest_first: bool = False
    ) -> tuple[list[tuple[int, str]], list[str]]:
        entries = self.queue.read(shard, limit, newest_first)
        return entries, list(dict.fromkeys(r for _, r in entries))

    def acknowledge(self, conn: sa.Connection, pending: PendingRows) -> None:
        self.queue.acknowledge(conn, [e for e, _ in pending.consumed])


class DiffFeed(BaseFeed):
    """The full comparison, every tick and every run: for `query:` sources and tiny tables."""

    mode = "diff"

    def ensure(self) -> None:
        """Triggers left from an earlier `change_capture: trigger` would fill a queue that
        nothing reads: drop them."""
        self.diff.typed_sql()  # every configured column exists
        if self._ensured:
            return
        with self.engine.begin() as conn:
            recorded = capture_row(conn, self.target)
            if recorded is not None and recorded.mode == "trigger" and self.spec.table:
                triggers = CaptureTriggers(self.spec, table_columns(conn, self.spec))
                ddl_lock(conn)
                execute_script(conn, triggers.drop_sql())
            if recorded is None or recorded.mode != self.mode:
                self.queue.clear(conn)
                record_capture(conn, self.target, self.mode, None)
        self._ensured = True

    def pending(self, shard: int, limit: int) -> PendingRows:
        self.ensure()
        return self.diff.pending(shard, limit)

    def work(self, ensure: bool = True) -> dict[int, tuple[int, str | None]]:
        if ensure:
            self.ensure()
        return {
            shard: (w.pending_rows, w.fingerprint)
            for shard, w in self.diff.exact_work().items()
            if w.pending_rows
        }

    def acknowledge(self, conn: sa.Connection, pending: PendingRows) -> None:
        return None

    def reconcile(self) -> int:
        """Nothing to catch up: every run of a diff source is a full comparison."""
        return 0

    def catch_up(self) -> int:
        return 0


def hold_writers(conn: sa.Connection, table: str) -> None:
    """Until the transaction ends, keep writers of the source out and wait for those in
    flight, so a diff that seeds a new generation's queue misses no change: a statement that
    ran its trigger before that generation existed has committed by then. A role that may
    not lock the table (a DBA installed the triggers) seeds without it."""
    try:
        with conn.begin_nested():
            conn.execute(sa.text(f"LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE"))
    except sa.exc.DBAPIError:
        log.warning("may not lock %s; seeding the change queue without holding writers", table)
