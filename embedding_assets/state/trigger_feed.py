"""The trigger feed: statement-level capture triggers fill the change queue with the ids of rows
whose watched columns changed; installed (or printed for a DBA) and re-installed when the
watched columns change."""

import logging
from dataclasses import replace

import sqlalchemy as sa

from embedding_assets.core.delta import PendingRows
from embedding_assets.state.ddl import STATE_SCHEMA, ddl_lock, execute_script
from embedding_assets.state.diff import Scope
from embedding_assets.state.feeds import QueueFeed, capture_row, hold_writers, record_capture
from embedding_assets.state.triggers import (
    OPERATIONS,
    CaptureTriggers,
    TriggerPrivilegeError,
    installed_signature,
    installed_triggers,
    may_create_triggers,
    table_columns,
)

log = logging.getLogger(__name__)


class TriggerFeed(QueueFeed):
    mode = "trigger"

    def triggers(self, conn: sa.Connection) -> CaptureTriggers:
        columns = table_columns(conn, self.spec)
        if not columns:
            raise LookupError(
                f"source {self.spec.name!r}: table {self.spec.table} does not exist; create "
                "it or fix `table:` in sources.yaml"
            )
        return CaptureTriggers(self.spec, columns, self.watched_extra)

    def ensure(self) -> None:
        if self._ensured:
            return
        self.diff.typed_sql()  # every configured column exists, before triggers go in
        with self.engine.begin() as conn:
            triggers = self.triggers(conn)
            signature = installed_signature(conn, triggers)
            complete = installed_triggers(conn, triggers) == len(OPERATIONS)
            if complete and signature == triggers.previous_body_signature:
                self._upgrade(conn, triggers)
            elif not (complete and signature == triggers.body_signature):
                self.install(conn, triggers)
            else:
                recorded = capture_row(conn, self.target)
                if recorded is None or recorded.mode != self.mode:
                    # Installed by a DBA (or an earlier mode): seed the queue once.
                    self._seed(conn, triggers)
        self._ensured = True

    def _seed(self, conn: sa.Connection, triggers: CaptureTriggers) -> int:
        hold_writers(conn, triggers.table)
        found = self.diff.enqueue_pending(conn)
        record_capture(conn, self.target, self.mode, triggers.signature)
        log.info("capture triggers of %s in place; queued %d rows", self.spec.name, found)
        return found

    def install(self, conn: sa.Connection, triggers: CaptureTriggers) -> int:
        """Create or replace the triggers and queue what a full diff finds pending, in one
        transaction: the trigger's lock on the table keeps writers out until both are done,
        so no change falls between the diff and the first captured statement."""
        if not may_create_triggers(conn, triggers.table):
            raise TriggerPrivilegeError(
                f"source {self.spec.name!r}: this database role may not create triggers on "
                f"{self.spec.table}, which change_capture: trigger needs. Ask a DBA to run "
                "the SQL below (also printed by `embedding-assets triggers sql --source "
                f"{self.spec.name}`), or set change_capture: watermark (with an indexed "
                "watermark_column) or diff.\n\n"
                + triggers.dba_sql(conn.scalar(sa.text("SELECT current_user")))
            )
        ddl_lock(conn)
        execute_script(conn, triggers.install_sql())
        return self._seed(conn, triggers)

    def _upgrade(self, conn: sa.Connection, triggers: CaptureTriggers) -> None:
        """Triggers of the version before the live lane: they capture every change, so the
        function is replaced without a new diff, or, where this role may not, kept (the
        lane is then woken by nothing and leaves the source to the sensor)."""
        if not may_create_triggers(conn, triggers.table):
            log.warning(
                "source %s: its capture triggers (installed by a DBA) do not notify the live "
                "lane; changes still reach the sinks through the sensor. For the lane, a DBA "
                "runs `embedding-assets triggers sql --source %s`",
                self.spec.name,
                self.spec.name,
            )
            return
        ddl_lock(conn)
        execute_script(conn, triggers.install_sql())
        record_capture(conn, self.target, self.mode, triggers.signature)
        log.info("capture triggers of %s now notify the live lane", self.spec.name)

    def drop(self) -> None:
        with self.engine.begin() as conn:
            triggers = self.triggers(conn)
            ddl_lock(conn)
            execute_script(conn, triggers.drop_sql())
            conn.execute(
                sa.text(f"DELETE FROM {STATE_SCHEMA}.capture WHERE target = :t"),
                {"t": self.target},
            )
        self._ensured = False

    def pending(self, shard: int, limit: int, newest_first: bool = False) -> PendingRows:
        self.ensure()
        self.errors.requeue_due()
        entries, ids = self._queued_pending(shard, limit, newest_first)
        scope = Scope(
            candidates=self.diff.sql.ids_predicate(self.id_type()),
            ledger="row_id = ANY(CAST(:ids AS text[]))",
            params={"ids": ids},
        )
        found = self.diff.pending(shard, limit, scope)
        return replace(found, consumed=entries, backlog=len(entries) >= limit)

    def work(self, ensure: bool = True) -> dict[int, tuple[int, str | None]]:
        if ensure:
            self.ensure()
            self.errors.requeue_due()
        return {
            shard: (q.entries, f"q{q.entries}:{q.first_id}:{q.last_id}")
            for shard, q in self.queue.summary_by_shard().items()
        }
