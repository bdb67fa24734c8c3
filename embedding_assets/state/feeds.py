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
from dataclasses import replace
from typing import Protocol

import sqlalchemy as sa

from embedding_assets.core.delta import PendingRows
from embedding_assets.settings import SourceSpec, split_qualified
from embedding_assets.state.ddl import STATE_SCHEMA, ddl_lock, execute_script
from embedding_assets.state.diff import Scope, SourceDiff
from embedding_assets.state.errors import RowErrors
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.source_sql import column_types, quote_ident, quote_table
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

TIMESTAMP_TYPES = ("timestamp", "date")  # format_type prefixes that take an interval


class ChangeFeed(Protocol):
    mode: str
    queue: ChangeQueue  # read by the trigger and watermark feeds; a diff feed clears it
    errors: RowErrors  # rows that failed, with their retry times

    def ensure(self) -> None:
        """Set capture up (install triggers, seed the queue); idempotent, cached."""

    def pending(self, shard: int, limit: int) -> PendingRows:
        """At most `limit` rows of the shard that need work, with what was consumed."""

    def work(self) -> dict[int, tuple[int, str | None]]:
        """Per shard with work: (pending rows, or an estimate; a fingerprint). Cheap."""

    def acknowledge(self, conn: sa.Connection, pending: PendingRows) -> None:
        """In the ledger write's transaction: consume `pending` (rows that failed are in
        the error table, which retries them)."""

    def reconcile(self) -> int:
        """Queue what a full diff finds pending; returns how many rows."""

    def catch_up(self) -> int:
        """Queue what a full diff finds pending, holding writers where that matters."""


def _capture_row(conn: sa.Connection, target: str):
    return conn.execute(
        sa.text(f"SELECT mode, signature FROM {STATE_SCHEMA}.capture WHERE target = :t"),
        {"t": target},
    ).one_or_none()


def _record_capture(conn: sa.Connection, target: str, mode: str, signature: str | None) -> None:
    conn.execute(
        sa.text(
            f"""INSERT INTO {STATE_SCHEMA}.capture (target, mode, signature, installed_at)
            VALUES (:t, :m, :s, now()) ON CONFLICT (target) DO UPDATE SET mode = EXCLUDED.mode,
                signature = EXCLUDED.signature, installed_at = EXCLUDED.installed_at"""
        ),
        {"t": target, "m": mode, "s": signature},
    )


class _Feed:
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


class _QueueFeed(_Feed):
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

    def _queued_pending(self, shard: int, limit: int) -> tuple[list[tuple[int, str]], list[str]]:
        entries = self.queue.read(shard, limit)
        return entries, list(dict.fromkeys(r for _, r in entries))

    def acknowledge(self, conn: sa.Connection, pending: PendingRows) -> None:
        self.queue.acknowledge(conn, [e for e, _ in pending.consumed])


class TriggerFeed(_QueueFeed):
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
            installed = installed_signature(
                conn, triggers
            ) == triggers.body_signature and installed_triggers(conn, triggers) == len(OPERATIONS)
            if not installed:
                self.install(conn, triggers)
            else:
                recorded = _capture_row(conn, self.target)
                if recorded is None or recorded.mode != self.mode:
                    # Installed by a DBA (or an earlier mode): seed the queue once.
                    self._seed(conn, triggers)
        self._ensured = True

    def _seed(self, conn: sa.Connection, triggers: CaptureTriggers) -> int:
        hold_writers(conn, triggers.table)
        found = self.diff.enqueue_pending(conn)
        _record_capture(conn, self.target, self.mode, triggers.signature)
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
                "watermark_column) or diff.\n\n" + triggers.dba_sql()
            )
        ddl_lock(conn)
        execute_script(conn, triggers.install_sql())
        return self._seed(conn, triggers)

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

    def pending(self, shard: int, limit: int) -> PendingRows:
        self.ensure()
        self.errors.requeue_due()
        entries, ids = self._queued_pending(shard, limit)
        scope = Scope(
            candidates=self.diff.sql.ids_predicate(self.id_type()),
            ledger="row_id = ANY(CAST(:ids AS text[]))",
            params={"ids": ids},
        )
        found = self.diff.pending(shard, limit, scope)
        return replace(found, consumed=entries, backlog=len(entries) >= limit)

    def work(self) -> dict[int, tuple[int, str | None]]:
        self.ensure()
        self.errors.requeue_due()
        return {
            shard: (q.entries, f"q{q.entries}:{q.first_id}:{q.last_id}")
            for shard, q in self.queue.summary_by_shard().items()
        }


class WatermarkFeed(_QueueFeed):
    mode = "watermark"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._wm_type: str | None = None

    @property
    def column(self) -> str:
        return f"s.{quote_ident(self.spec.watermark_column or '')}"

    def wm_type(self) -> str:
        if self._wm_type is None:
            with self.engine.connect() as conn:
                probe = self.diff.sql.column_types_probe([self.spec.watermark_column or ""])
                self._wm_type = column_types(conn, probe)[0]
        return self._wm_type

    def ensure(self) -> None:
        if self._ensured:
            return
        self.diff.typed_sql()  # every configured column exists
        self.wm_type()
        with self.engine.begin() as conn:
            recorded = _capture_row(conn, self.target)
            if recorded is None or recorded.mode != self.mode:
                _record_capture(conn, self.target, self.mode, None)
        self._ensured = True

    def _since(self, param: str = "since") -> str:
        """`column >= watermark`, widened by the overlap window for time columns, so a row
        committed late with an older timestamp is still seen (and found current if done)."""
        wm_type = self.wm_type()
        bound = f"CAST(:{param} AS {wm_type})"
        if wm_type.startswith(TIMESTAMP_TYPES) and self.spec.watermark_overlap_seconds:
            bound += f" - make_interval(secs => {int(self.spec.watermark_overlap_seconds)})"
        return f"{self.column} >= {bound}"

    def watermarks(self) -> dict[int, str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.text(f"SELECT shard, value FROM {STATE_SCHEMA}.watermarks WHERE target = :t"),
                {"t": self.target},
            ).fetchall()
        return {r.shard: r.value for r in rows}

    def _ceiling(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.scalar(
                sa.text(f"SELECT CAST(max({self.column}) AS text) FROM {self.diff.sql.relation}")
            )

    def pending(self, shard: int, limit: int) -> PendingRows:
        self.ensure()
        self.errors.requeue_due()
        since = self.watermarks().get(shard)
        ceiling = self._ceiling()  # before the read: anything later is past the new mark
        entries, ids = self._queued_pending(shard, limit)
        by_id = self.diff.sql.ids_predicate(self.id_type())
        window = self._since() if since is not None else "true"
        if since is not None:
            # Rows sharing an id with a row in the window, so a duplicated id is seen whole.
            id_col = self.diff.sql.column(self.spec.id_column)
            window = (
                f"({window}) OR {id_col} IN (SELECT {id_col} FROM {self.diff.sql.relation} "
                f"WHERE {window})"
            )
        scope = Scope(
            candidates=f"({window}) OR {by_id}",
            ledger="row_id = ANY(CAST(:ids AS text[])) OR row_id IN (SELECT row_id FROM src)",
            params={"ids": ids, "since": since},
            order_by="j.watermark_value NULLS FIRST, j.row_id",
            watermark=True,
        )
        found = self.diff.pending(shard, limit, scope)
        mark = ceiling if not found.backlog else (found.watermark or since)
        return replace(found, consumed=entries, watermark=mark)

    def acknowledge(self, conn: sa.Connection, pending: PendingRows) -> None:
        super().acknowledge(conn, pending)
        if pending.watermark is not None:
            conn.execute(
                sa.text(
                    f"""INSERT INTO {STATE_SCHEMA}.watermarks (target, shard, value)
                    VALUES (:t, :s, :v) ON CONFLICT (target, shard)
                    DO UPDATE SET value = EXCLUDED.value"""
                ),
                {"t": self.target, "s": pending.shard, "v": pending.watermark},
            )

    def work(self) -> dict[int, tuple[int, str | None]]:
        """Pending rows past each shard's watermark (one diff over the window since the
        lowest mark), plus queued rows. A shard with no mark yet has a full diff to do."""
        self.ensure()
        self.errors.requeue_due()
        marks = self.watermarks()
        queued = self.queue.summary_by_shard()
        work: dict[int, tuple[int, str | None]] = {}
        unmarked = [s for s in range(self.spec.shards) if s not in marks]
        if unmarked:
            # One diff serves every unmarked shard: a shard's diff scans the whole source too.
            full = self.diff.exact_work()
            for shard in unmarked:
                if full[shard].pending_rows:
                    work[shard] = (full[shard].pending_rows, f"full:{full[shard].fingerprint}")
        if marks:
            counts = self._window_pending(marks)
            for shard, (n, digest) in counts.items():
                if shard not in unmarked and n:
                    work[shard] = (n, f"w{digest}")
        for shard, q in queued.items():
            n, fingerprint = work.get(shard, (0, ""))
            work[shard] = (n + q.entries, f"{fingerprint}:q{q.entries}:{q.first_id}:{q.last_id}")
        return work

    def _window_pending(self, marks: dict[int, str]) -> dict[int, tuple[int, str]]:
        # Marks as text do not order like their type's values; let Postgres pick the lowest.
        with self.engine.connect() as conn:
            lowest = conn.scalar(
                sa.text(
                    f"SELECT CAST(min(CAST(v AS {self.wm_type()})) AS text) "
                    "FROM unnest(CAST(:vs AS text[])) AS v"
                ),
                {"vs": list(marks.values())},
            )
        scope = Scope(
            candidates=self._since(),
            ledger="row_id IN (SELECT row_id FROM src)",
            params={"since": lowest},
            watermark=True,
        )
        query = f"""SELECT shard, count(*) AS n,
                md5(string_agg(row_id || ':' || coalesce(content_hash, ''), ',' ORDER BY row_id))
                    AS digest
            FROM ({self.diff._joined(None, scope)}) AS j WHERE j.pending GROUP BY shard"""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(query), self.diff._params(None, scope)).fetchall()
        return {r.shard: (r.n, r.digest) for r in rows}


class DiffFeed(_Feed):
    """The full comparison, every tick and every run: for `query:` sources and tiny tables."""

    mode = "diff"

    def ensure(self) -> None:
        """Triggers left from an earlier `change_capture: trigger` would fill a queue that
        nothing reads: drop them."""
        self.diff.typed_sql()  # every configured column exists
        if self._ensured:
            return
        with self.engine.begin() as conn:
            recorded = _capture_row(conn, self.target)
            if recorded is not None and recorded.mode == "trigger" and self.spec.table:
                triggers = CaptureTriggers(self.spec, table_columns(conn, self.spec))
                ddl_lock(conn)
                execute_script(conn, triggers.drop_sql())
            if recorded is None or recorded.mode != self.mode:
                self.queue.clear(conn)
                _record_capture(conn, self.target, self.mode, None)
        self._ensured = True

    def pending(self, shard: int, limit: int) -> PendingRows:
        self.ensure()
        return self.diff.pending(shard, limit)

    def work(self) -> dict[int, tuple[int, str | None]]:
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


def resolve_mode(engine: sa.Engine, spec: SourceSpec, watched_extra: tuple[str, ...] = ()) -> str:
    """`auto`: triggers for a `table:` source when this role may create them, else diff."""
    if spec.change_capture != "auto":
        return spec.change_capture
    if spec.table is None:
        return "diff"
    with engine.connect() as conn:
        table = quote_table(split_qualified(spec.table))
        if not conn.scalar(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}):
            raise LookupError(
                f"source {spec.name!r}: table {spec.table} does not exist; create it (or "
                "fix `table:` in sources.yaml)"
            )
        if may_create_triggers(conn, table):
            return "trigger"
        triggers = CaptureTriggers(spec, table_columns(conn, spec), watched_extra)
        if installed_signature(conn, triggers) == triggers.body_signature:
            return "trigger"  # a DBA installed them for this role
    log.warning(
        "source %s: this role may not create triggers on %s; capturing changes by full diff "
        "(`embedding-assets triggers sql` prints the SQL for a DBA)",
        spec.name,
        spec.table,
    )
    return "diff"


FEEDS = {"trigger": TriggerFeed, "watermark": WatermarkFeed, "diff": DiffFeed}


def build_feed(
    engine: sa.Engine, spec: SourceSpec, diff: SourceDiff, watched_extra: tuple[str, ...] = ()
) -> ChangeFeed:
    """The source's feed for the generation `diff` compares with; `watched_extra`: the
    template columns of its other generations, which the one capture trigger watches too."""
    queue = ChangeQueue(engine, diff.target)
    mode = resolve_mode(engine, spec, watched_extra)
    return FEEDS[mode](engine, spec, diff, queue, watched_extra)
