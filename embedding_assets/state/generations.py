"""Generations of a source: one per pipeline (model, dimension, text template, chunking,
text rules), each with its own pgvector table, Qdrant collection and ledger key.

States: `building` (kept current from the change feed, not read by anyone), `live` (what
readers get through the stable names), `previous` (the live one before the last promotion:
not updated any more, kept for rollback), `dropped` (its table, collection and state gone;
the row stays as history). At most one generation is live and one is building.

Names: the stable reader names are the configured ones (a view `<table>`, a Qdrant alias
`<collection>` on a server). A generation's own table is `<table>__g<N>` and its collection
`<collection>__g<N>`, names that never become a view or an alias, so a run that still
holds a generation's name can never write into another generation. Generation 1 keeps the
source's original ledger key, and with the embedded Qdrant engine (no aliases) its
original collection name, so state from before generations existed is adopted as it is.
"""

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA, ddl_lock
from embedding_assets.state.migrations import migrate

ACTIVE_STATES = ("live", "building")  # the generations the change feed fills
KEPT_STATES = ("live", "building", "previous")
POSTGRES_NAME_LIMIT = 63  # NAMEDATALEN - 1: longer identifiers are cut, silently


# Every per-target table of the state schema: what dropping a generation removes.
TARGET_TABLES = (
    "row_state",
    "change_queue",
    "capture",
    "watermarks",
    "row_errors",
    "vector_cache",
    "row_chunks",
    "shard_counts",
    "applied_config",
    "write_counts",
    "targets",
)


class GenerationError(RuntimeError):
    """A generation operation that cannot be done; the message names the fix."""


def pipeline_key(pipeline: dict[str, Any]) -> str:
    """A stable hash of what shapes a generation's vectors."""
    return hashlib.sha256(json.dumps(pipeline, sort_keys=True).encode()).hexdigest()[:16]


def generation_name(name: str, number: int) -> str:
    return f"{name}__g{number}"


@dataclass(frozen=True)
class Generation:
    source: str
    number: int
    target: str
    pg_table: str
    collection: str
    pipeline_key: str
    pipeline: dict[str, Any]
    model: str
    state: str
    promote: str
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    dropped_at: datetime | None
    blocked_reason: str | None
    blocked_at: datetime | None

    @property
    def schema_table(self) -> tuple[str, str]:
        schema, _, table = self.pg_table.partition(".")
        return schema, table

    def describe(self) -> dict[str, Any]:
        """JSON-ready: what `generations list` and `status --json` show."""
        return {
            "number": self.number,
            "model": self.model,
            "state": self.state,
            "pgvector_table": self.pg_table,
            "qdrant_collection": self.collection,
            "promote": self.promote,
            "created_at": _iso(self.created_at),
            "promoted_at": _iso(self.promoted_at),
            "retired_at": _iso(self.retired_at),
            "blocked_reason": self.blocked_reason,
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


_COLUMNS = ", ".join(Generation.__dataclass_fields__)


class Generations:
    """The generation registry of one source."""

    def __init__(self, engine: sa.Engine, source: str):
        self.engine = engine
        self.source = source
        migrate(engine)

    def all(self, conn: sa.Connection | None = None, lock: bool = False) -> list[Generation]:
        query = sa.text(
            f"SELECT {_COLUMNS} FROM {STATE_SCHEMA}.generations WHERE source = :s "
            f"ORDER BY number{' FOR UPDATE' if lock else ''}"
        )
        if conn is None:
            with self.engine.connect() as own:
                rows = own.execute(query, {"s": self.source}).fetchall()
        else:
            rows = conn.execute(query, {"s": self.source}).fetchall()
        return [Generation(*row) for row in rows]

    def kept(self) -> list[Generation]:
        return [g for g in self.all() if g.state in KEPT_STATES]

    def get(self, number: int, conn: sa.Connection | None = None) -> Generation:
        for generation in self.all(conn):
            if generation.number == number:
                return generation
        raise GenerationError(
            f"source {self.source!r} has no generation {number}; "
            f"`embedding-assets generations list --source {self.source}` shows them"
        )

    def in_state(self, state: str, conn: sa.Connection | None = None) -> Generation | None:
        return next((g for g in self.all(conn) if g.state == state), None)

    def insert(self, conn: sa.Connection, generation: Generation) -> None:
        conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.generations
                (source, number, target, pg_table, collection, pipeline_key, pipeline, model,
                 state, promote, promoted_at)
                VALUES (:source, :number, :target, :pg_table, :collection, :pipeline_key,
                    CAST(:pipeline AS jsonb), :model, :state, :promote,
                    CASE WHEN :state = 'live' THEN now() END)"""
            ),
            {
                "source": generation.source,
                "number": generation.number,
                "target": generation.target,
                "pg_table": generation.pg_table,
                "collection": generation.collection,
                "pipeline_key": generation.pipeline_key,
                "pipeline": json.dumps(generation.pipeline),
                "model": generation.model,
                "state": generation.state,
                "promote": generation.promote,
            },
        )

    def set_state(self, conn: sa.Connection, number: int, state: str, **extra: str) -> None:
        """Move a generation to `state`, stamping the time that goes with it."""
        stamp = {
            "live": "promoted_at = now(), blocked_reason = NULL, blocked_at = NULL",
            "previous": "retired_at = now()",
            "dropped": "dropped_at = now()",
            "building": "blocked_reason = NULL, blocked_at = NULL",
        }[state]
        sets = "".join(f", {column} = :{column}" for column in extra)
        conn.execute(
            sa.text(
                f"UPDATE {STATE_SCHEMA}.generations SET state = :state, {stamp}{sets} "
                "WHERE source = :s AND number = :n"
            ),
            {"state": state, "s": self.source, "n": number, **extra},
        )

    def set_pipeline(self, conn: sa.Connection, number: int, key: str, pipeline: dict) -> None:
        """Record that generation `number` is the pipeline `key` (see
        `sync.generations.serves_as_is`)."""
        conn.execute(
            sa.text(
                f"UPDATE {STATE_SCHEMA}.generations SET pipeline_key = :k, "
                "pipeline = CAST(:p AS jsonb) WHERE source = :s AND number = :n"
            ),
            {"k": key, "p": json.dumps(pipeline), "s": self.source, "n": number},
        )

    def set_collection(self, conn: sa.Connection, number: int, collection: str) -> None:
        conn.execute(
            sa.text(
                f"UPDATE {STATE_SCHEMA}.generations SET collection = :c "
                "WHERE source = :s AND number = :n"
            ),
            {"c": collection, "s": self.source, "n": number},
        )

    def record_blocked(self, number: int, reason: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.generations SET blocked_reason = CAST(:r AS text),
                    blocked_at = CASE WHEN CAST(:r AS text) IS NULL THEN NULL ELSE now() END
                    WHERE source = :s AND number = :n"""
                ),
                {"r": reason, "s": self.source, "n": number},
            )

    def expired(self, keep_hours: float) -> list[Generation]:
        """Previous generations retired more than `keep_hours` ago."""
        with self.engine.connect() as conn:
            numbers = set(
                conn.scalars(
                    sa.text(
                        f"""SELECT number FROM {STATE_SCHEMA}.generations WHERE source = :s
                        AND state = 'previous'
                        AND retired_at < now() - make_interval(secs => :secs)"""
                    ),
                    {"s": self.source, "secs": keep_hours * 3600},
                )
            )
        return [g for g in self.all() if g.number in numbers]


def forget_target(conn: sa.Connection, target: str) -> None:
    """Remove every state row of a target (a dropped generation)."""
    for table in TARGET_TABLES:
        conn.execute(
            sa.text(f"DELETE FROM {STATE_SCHEMA}.{table} WHERE target = :t"), {"t": target}
        )


def lock_registry(conn: sa.Connection) -> None:
    """Generation changes are rare: serialise them with the project's DDL lock."""
    ddl_lock(conn)


def kept_template_columns(conn: sa.Connection, source: str) -> tuple[str, ...]:
    """The template columns of the source's kept generations (what the one capture trigger
    watches besides the configured template), read only; () before the registry exists."""
    from embedding_assets.config.base import template_fields

    registry = f"{STATE_SCHEMA}.generations"
    # Each step only once the one before holds: these functions raise on a missing object.
    for check in (
        "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :s)",
        "SELECT has_schema_privilege(:s, 'USAGE')",
        "SELECT to_regclass(:t) IS NOT NULL",
        "SELECT has_table_privilege(:t, 'SELECT')",
    ):
        if not conn.scalar(sa.text(check), {"s": STATE_SCHEMA, "t": registry}):
            return ()
    texts = conn.scalars(
        sa.text(f"SELECT pipeline->>'text' FROM {registry} WHERE source = :s AND state = ANY(:k)"),
        {"s": source, "k": list(KEPT_STATES)},
    )
    return tuple(sorted({c for text in texts for c in template_fields(text)}))
