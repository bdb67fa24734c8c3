"""The diff of source rows against the ledger, over a scope: a whole shard (full diff), the
ids a queue names, or a watermark window. Every change feed asks it which of its candidate
rows really need work, so correctness never rests on a cursor or a trigger alone.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import PendingRows, RowFailure
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.errors import held
from embedding_assets.state.source_sql import (
    SourceSql,
    catalog_columns,
    column_types,
    meta_alias,
    quote_table,
    raw_sql,
)


class SourceColumnsError(ValueError):
    """sources.yaml names a column the source does not have."""


DUPLICATE_KIND = "duplicate_id"


@dataclass(frozen=True)
class ShardWork:
    """What a shard has to do. Counts that a cheap read cannot give are None."""

    shard: int
    pending_rows: int
    qdrant_lag_rows: int
    fingerprint: str | None  # changes whenever the shard's outstanding work changes
    eligible_rows: int | None = None
    embedded_rows: int | None = None

    @property
    def has_work(self) -> bool:
        return self.pending_rows > 0 or self.qdrant_lag_rows > 0


@dataclass(frozen=True)
class Scope:
    """Which rows to compare: `candidates` is a predicate over the source alias `s` (None:
    every row of the shard), `ledger` one over the ledger alias `st` (None: the shard)."""

    candidates: str | None = None
    ledger: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    order_by: str = "j.row_id"
    watermark: bool = False  # carry the source's watermark column (watermark feeds)


class SourceDiff:
    def __init__(self, engine: sa.Engine, spec: SourceSpec, target: str, version: str):
        self.engine = engine
        self.spec = spec
        self.sql = SourceSql(spec)
        self.target = target
        self.version = version
        self._typed_sql: SourceSql | None = None
        self._unique_ids = False

    def typed_sql(self) -> SourceSql:
        """The source's SQL with its metadata columns read by type, after checking that
        every configured column exists (once, cached). A table's columns come from the
        catalog, which a lock on the table does not block."""
        if self._typed_sql is None:
            with self.engine.connect() as conn:
                columns = self._source_columns(conn)
                self._check_columns(set(columns))
                self._unique_ids = self._id_is_unique(conn)
            self._typed_sql = SourceSql(self.spec, [columns[c] for c in self.spec.metadata])
        return self._typed_sql

    def _source_columns(self, conn: sa.Connection) -> dict[str, str]:
        """{column: format_type name} of the source."""
        if self.spec.table:
            found = catalog_columns(conn, quote_table(split_qualified(self.spec.table)))
            if found:
                return {name: pg_type for name, (pg_type, _) in found.items()}
        # A query (or a missing table: Postgres's own error names it).
        probe = f"SELECT * FROM {self.sql.relation} LIMIT 0"
        names = list(conn.execute(sa.text(probe)).keys())
        return dict(zip(names, column_types(conn, probe), strict=True))

    def _id_is_unique(self, conn: sa.Connection) -> bool:
        """A table whose id column alone carries a unique index (its primary key, usually)."""
        if not self.spec.table:
            return False
        return bool(
            conn.scalar(
                sa.text(
                    """SELECT EXISTS (SELECT 1 FROM pg_index AS i JOIN pg_attribute AS a
                        ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = to_regclass(:rel) AND i.indisunique
                        AND i.indnkeyatts = 1 AND i.indpred IS NULL AND i.indexprs IS NULL
                        AND a.attname = :id)"""
                ),
                {
                    "rel": quote_table(split_qualified(self.spec.table)),
                    "id": self.spec.id_column,
                },
            )
        )

    def _check_columns(self, names: set[str]) -> None:
        """Every column sources.yaml names exists, before anything is read or written."""
        spec = self.spec
        named = [
            ("id_column", [spec.id_column]),
            ("text", spec.text_columns),
            ("metadata", spec.metadata),
            ("watermark_column", [spec.watermark_column] if spec.watermark_column else []),
        ]
        missing = [(key, c) for key, columns in named for c in columns if c not in names]
        if missing:
            listed = ", ".join(f"{key} names {c!r}" for key, c in missing)
            raise SourceColumnsError(
                f"source {spec.name!r}: {listed}, which the source does not have (its "
                f"columns: {sorted(names)}). Fix the name; for an expression or a name "
                "that is awkward in a template, alias it in a `query:` "
                '(SELECT *, price * qty AS total, "Unit Price" AS unit_price FROM ...)'
            )

    def _joined(self, shard: int | None, scope: Scope) -> str:
        """Source rows FULL JOIN the ledger (and the error table), with the flags every
        count is made of. A row is pending when it needs work and is not held back by the
        error table (its failed content waits for its retry time, or is dead)."""
        needs_work = """(NOT coalesce(src.eligible, false) AND st.row_id IS NOT NULL
                    AND NOT st.deleted)
                OR (coalesce(src.eligible, false) AND (st.row_id IS NULL OR st.deleted
                    OR st.content_hash IS DISTINCT FROM src.content_hash
                    OR st.version <> :version))"""
        held_back = f"coalesce(src.eligible, false) AND {held('e', 'src.content_hash')}"
        if scope.ledger is not None:
            ledger = f"AND ({scope.ledger})"
        else:
            ledger = "AND shard = :shard" if shard is not None else ""
        # A duplicated id (several eligible rows) is never written: the id keeps what it
        # has, and the duplicate is work (to be reported) until the error table records
        # this exact set of copies. Ineligible copies beside an eligible one are ignored.
        duplicate = "coalesce(src.copies, 1) > 1"
        new_duplicate = (
            f"{duplicate} AND (e.row_id IS NULL OR e.kind <> '{DUPLICATE_KIND}' "
            "OR e.content_hash IS DISTINCT FROM src.copies_hash)"
        )
        rows = self.typed_sql().rows(shard, scope.candidates, scope.watermark)
        if self._unique_ids:
            # A unique index on the id: no duplicates possible, and no sort to find them.
            src = f"src AS (SELECT r.*, 1 AS copies, NULL AS copies_hash FROM ({rows}) AS r),"
        else:
            src = f"""src_all AS (
                SELECT r.*,
                    count(*) FILTER (WHERE r.eligible) OVER ids AS copies,
                    'duplicate:' || (count(*) FILTER (WHERE r.eligible) OVER ids) || ':'
                        || md5(min(r.content_hash) FILTER (WHERE r.eligible) OVER ids
                            || max(r.content_hash) FILTER (WHERE r.eligible) OVER ids)
                        AS copies_hash,
                    row_number() OVER (ids ORDER BY r.eligible DESC) AS nth
                FROM ({rows}) AS r WINDOW ids AS (PARTITION BY r.row_id)),
            src AS (SELECT * FROM src_all WHERE eligible OR (copies = 0 AND nth = 1)),"""
        return f"""
            WITH {src}
            st AS (SELECT * FROM {STATE_SCHEMA}.row_state WHERE target = :target {ledger})
            SELECT coalesce(src.row_id, st.row_id) AS row_id,
                   coalesce(src.shard, st.shard) AS shard,
                   coalesce(src.eligible, false) AS eligible,
                   (coalesce(src.eligible, false) AND st.row_id IS NOT NULL AND NOT st.deleted
                    AND st.content_hash = src.content_hash AND st.version = :version) AS current,
                   (({needs_work}) AND NOT coalesce({held_back}, false)
                    AND NOT {duplicate}) OR ({new_duplicate})
                    OR (e.kind = '{DUPLICATE_KIND}' AND NOT {duplicate}) AS pending,
                   {duplicate} AS duplicate, src.copies, src.copies_hash,
                   ({needs_work}) AND coalesce({held_back}, false) AS held,
                   (st.row_id IS NOT NULL AND (st.qdrant_hash IS DISTINCT FROM st.content_hash
                    OR st.qdrant_chunk_count <> st.chunk_count)) AS qdrant_lag,
                   NOT coalesce(src.eligible, false) AS is_delete,
                   src.doc, src.is_empty, src.content_hash,
                   st.content_hash AS stored_hash, st.pg_synced_at, e.attempts
                   {", src.watermark_value, src.watermark" if scope.watermark else ""}
                   {"".join(f", src.{meta_alias(i)}" for i in range(len(self.spec.metadata)))}
            FROM src FULL OUTER JOIN st ON st.row_id = src.row_id
            LEFT JOIN {STATE_SCHEMA}.row_errors AS e
                ON e.target = :target AND e.row_id = coalesce(src.row_id, st.row_id)"""

    def _params(self, shard: int | None, scope: Scope, **extra: Any) -> dict[str, Any]:
        return {
            "target": self.target,
            "version": self.version,
            "shard": shard,
            **scope.params,
            **extra,
        }

    def pending(self, shard: int, limit: int, scope: Scope = Scope()) -> PendingRows:
        """The scope's rows to (re)embed and row ids to remove, in `scope.order_by` order."""
        query = f"""
            SELECT j.*, now() AS computed_at FROM ({self._joined(shard, scope)}) AS j
            WHERE j.pending ORDER BY {scope.order_by} LIMIT :limit"""
        with self.engine.connect() as conn:
            result = conn.execute(sa.text(query), self._params(shard, scope, limit=limit + 1))
            # object dtype keeps metadata values as the driver returned them (an integer
            # column with NULLs must not turn into floats).
            frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()), dtype=object)
            computed_at: datetime = conn.scalar(sa.text("SELECT now()"))
        backlog = len(frame) > limit
        frame = frame.iloc[:limit]
        if len(frame) and not frame["computed_at"].isna().all():
            computed_at = frame["computed_at"].iloc[0]
        duplicates = frame[frame["duplicate"].astype(bool)] if len(frame) else frame
        failures = {
            row.row_id: RowFailure(
                row.copies_hash,
                DUPLICATE_KIND,
                f"{int(row.copies)} rows of source {self.spec.name!r} have id {row.row_id!r}; "
                f"`{self.spec.id_column}` must identify one row. The id keeps what was stored "
                "before; remove the extra rows, or fix the query or id_column",
            )
            for row in duplicates[["row_id", "copies", "copies_hash"]].itertuples(index=False)
        }
        frame = frame[~frame["row_id"].isin(failures.keys())] if failures else frame
        is_delete = frame["is_delete"].astype(bool)
        upserts = frame[~is_delete]
        # Metadata stays under its m_<i> aliases: a user's column name can be anything.
        metas = [meta_alias(i) for i in range(len(self.spec.metadata))]
        keep = ["row_id", "doc", "is_empty", "content_hash", "stored_hash", *metas]
        marks = frame["watermark"].dropna().tolist() if scope.watermark else []
        return PendingRows(
            source=self.spec.name,
            shard=shard,
            version=self.version,
            computed_at=computed_at,
            rows=upserts[keep].reset_index(drop=True),
            deleted=frame.loc[is_delete, "row_id"].tolist(),
            backlog=backlog,
            watermark=marks[-1] if marks else None,
            failures=failures,
        )

    def exact_work(self, shard: int | None = None, remember: bool = True) -> dict[int, ShardWork]:
        """Per shard (or for one shard only), by a full diff: eligible, current, pending and
        Qdrant-lagging rows, and a fingerprint of the outstanding work (row ids, source and
        stored hashes, last write time). Cost: the whole source, hashed."""
        query = f"""
            SELECT shard,
                   count(*) FILTER (WHERE eligible) AS eligible_rows,
                   count(*) FILTER (WHERE current) AS embedded_rows,
                   count(*) FILTER (WHERE pending) AS pending_rows,
                   count(*) FILTER (WHERE qdrant_lag) AS qdrant_lag_rows,
                   md5(string_agg(concat_ws(':', row_id, content_hash, stored_hash,
                                            CAST(pg_synced_at AS text), attempts),
                       ',' ORDER BY row_id) FILTER (WHERE pending OR qdrant_lag)) AS fingerprint
            FROM ({self._joined(shard, Scope())}) AS j GROUP BY shard"""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.text(query), self._params(shard, Scope())).fetchall()
            work = {
                i: ShardWork(i, 0, 0, None, 0, 0)
                for i in (range(self.spec.shards) if shard is None else [shard])
            }
            for row in rows:
                work[row.shard] = ShardWork(
                    row.shard,
                    row.pending_rows,
                    row.qdrant_lag_rows,
                    row.fingerprint,
                    row.eligible_rows,
                    row.embedded_rows,
                )
            if remember:
                self._remember_counts(conn, work)
        return work

    def _remember_counts(self, conn: sa.Connection, work: dict[int, ShardWork]) -> None:
        """Keep each shard's eligible-row count, so status can show it without a rescan."""
        conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.shard_counts AS c
                    (target, shard, eligible_rows, counted_at)
                SELECT :t, u.shard, u.n, now()
                FROM unnest(CAST(:shards AS int[]), CAST(:counts AS bigint[])) AS u(shard, n)
                ON CONFLICT (target, shard) DO UPDATE SET
                    eligible_rows = EXCLUDED.eligible_rows, counted_at = EXCLUDED.counted_at"""
            ),
            {
                "t": self.target,
                "shards": list(work),
                "counts": [w.eligible_rows or 0 for w in work.values()],
            },
        )

    def enqueue_pending(self, conn: sa.Connection) -> int:
        """Queue (in the caller's transaction) every row a full diff finds pending and not
        queued yet; returns how many rows the diff found pending. For reconciliation and
        for seeding a new change queue."""
        joined = self._joined(None, Scope())
        found = conn.execute(
            sa.text(
                f"""WITH pending AS (SELECT j.shard, j.row_id FROM ({joined}) AS j WHERE j.pending),
                queued AS (
                    INSERT INTO {STATE_SCHEMA}.change_queue (target, shard, row_id)
                    SELECT :target, p.shard, p.row_id FROM pending AS p
                    WHERE NOT EXISTS (SELECT 1 FROM {STATE_SCHEMA}.change_queue AS q
                                      WHERE q.target = :target AND q.row_id = p.row_id)
                    ORDER BY p.row_id
                    RETURNING 1)
                SELECT (SELECT count(*) FROM pending) AS found, (SELECT count(*) FROM queued)"""
            ),
            self._params(None, Scope()),
        ).one()
        return int(found.found)

    def leaving_rows(self) -> tuple[str, dict[str, Any]]:
        """SQL selecting the ids of rows the ledger holds that are no longer eligible (the
        rows a full diff would delete), and its parameters."""
        sql = f"SELECT j.row_id FROM ({self._joined(None, Scope())}) AS j WHERE j.is_delete"
        return sql, self._params(None, Scope())

    def null_id_rows(self) -> int:
        """Eligible source rows whose id is NULL: they cannot be tracked, so they are never
        embedded. Free for a NOT NULL id (the planner drops the scan); an index on the id
        answers it otherwise, else it scans the source."""
        user_where = f"({raw_sql(self.spec.where)})" if self.spec.where else "true"
        id_col = self.sql.column(self.spec.id_column)
        with self.engine.connect() as conn:
            return int(
                conn.scalar(
                    sa.text(
                        f"SELECT count(*) FROM {self.sql.relation} "
                        f"WHERE {id_col} IS NULL AND coalesce({user_where}, false)"
                    )
                )
            )

    def counted(self) -> tuple[int | None, str | None]:
        """The last full diff's eligible-row total and when it ran (None if never)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    f"""SELECT sum(eligible_rows) AS n, CAST(min(counted_at) AS text) AS at
                    FROM {STATE_SCHEMA}.shard_counts WHERE target = :t"""
                ),
                {"t": self.target},
            ).one()
        return (int(row.n) if row.n is not None else None, row.at)
