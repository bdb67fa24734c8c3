"""The watermark feed: rows whose indexed `updated_at`-like column passed the shard's mark (with an
overlap window for late commits); deletes are found by the scheduled reconcile."""

from dataclasses import replace

import sqlalchemy as sa

from embedding_assets.core.delta import PendingRows
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.diff import Scope
from embedding_assets.state.feeds import QueueFeed, capture_row, record_capture
from embedding_assets.state.source_sql import column_types, quote_ident

TIMESTAMP_TYPES = ("timestamp", "date")  # format_type prefixes that take an interval


class WatermarkFeed(QueueFeed):
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
            recorded = capture_row(conn, self.target)
            if recorded is None or recorded.mode != self.mode:
                record_capture(conn, self.target, self.mode, None)
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

    def work(self, ensure: bool = True) -> dict[int, tuple[int, str | None]]:
        """Pending rows past each shard's watermark (one diff over the window since the
        lowest mark), plus queued rows. A shard with no mark yet has a full diff to do."""
        if ensure:
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
