"""What a source that is no longer in sources.yaml left in the database: its capture triggers
(still queueing every write to the table), its queued entries and staged stage outputs.

A rename or a typo must never delete anything, so `status` only reports these, and
`embedding-assets prune --source NAME` removes them on request. Stored vectors (chunk tables,
ledger, collections) are not touched: a source renamed back finds them as they were.
"""

from dataclasses import dataclass

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA, ddl_lock
from embedding_assets.state.source_sql import quote_ident
from embedding_assets.state.triggers import OPERATIONS, capture_function, trigger_name

# A staged output's asset key starts with its source's name (no LIKE: `_` is a wildcard).
_OF_SOURCE = "left(asset_key, length(:k)) = :k"


@dataclass(frozen=True)
class Leftover:
    source: str
    triggers: tuple[str, ...]  # "schema.table.trigger"
    function: bool  # its capture function exists
    queued: int  # change-queue entries of its generations
    staged: int  # staged stage outputs of its assets

    @property
    def any(self) -> bool:
        return bool(self.triggers or self.function or self.queued or self.staged)

    def describe(self) -> str:
        parts = []
        if self.triggers:
            tables = sorted({t.rsplit(".", 1)[0] for t in self.triggers})
            parts.append(f"{len(self.triggers)} capture triggers on {', '.join(tables)}")
        if self.queued:
            parts.append(f"{self.queued} queued changes nothing reads")
        if self.staged:
            parts.append(f"{self.staged} staged stage outputs")
        if self.function and not self.triggers:
            parts.append("its capture function")
        return (
            f"source {self.source!r} is not in sources.yaml but left {'; '.join(parts)}. "
            f"`embedding-assets prune --source {self.source}` removes them (stored vectors "
            "stay); or put the source back"
        )


def _sources_with_objects(conn: sa.Connection) -> set[str]:
    registered = set(
        conn.scalars(sa.text(f"SELECT DISTINCT source FROM {STATE_SCHEMA}.generations"))
    )
    functions = conn.scalars(
        sa.text(
            """SELECT p.proname FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
            WHERE n.nspname = :s AND p.proname LIKE 'capture\\_%'"""
        ),
        {"s": STATE_SCHEMA},
    )
    return registered | {name.removeprefix("capture_") for name in functions}


def find(conn: sa.Connection, source: str) -> Leftover:
    triggers = conn.scalars(
        sa.text(
            """SELECT n.nspname || '.' || c.relname || '.' || t.tgname FROM pg_trigger AS t
            JOIN pg_class AS c ON c.oid = t.tgrelid JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE t.tgname = ANY(:names)"""
        ),
        {"names": [trigger_name(source, op) for op in OPERATIONS]},
    )
    function = conn.scalar(
        sa.text("SELECT to_regprocedure(:f) IS NOT NULL"),
        {"f": f"{capture_function(source)}()"},
    )
    queued = conn.scalar(
        sa.text(
            f"""SELECT count(*) FROM {STATE_SCHEMA}.change_queue WHERE target IN (
                SELECT target FROM {STATE_SCHEMA}.generations WHERE source = :s)"""
        ),
        {"s": source},
    )
    staged = conn.scalar(
        sa.text(f"SELECT count(*) FROM {STATE_SCHEMA}.staged_outputs WHERE {_OF_SOURCE}"),
        {"k": f"{source}/"},
    )
    return Leftover(source, tuple(sorted(triggers)), bool(function), int(queued), int(staged))


def leftovers(engine: sa.Engine, configured: set[str]) -> list[Leftover]:
    """Objects of sources that are not configured (read only)."""
    with engine.connect() as conn:
        if not conn.scalar(
            sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": f"{STATE_SCHEMA}.generations"}
        ):
            return []
        found = [find(conn, s) for s in sorted(_sources_with_objects(conn) - configured)]
    return [f for f in found if f.any]


def prune(engine: sa.Engine, source: str) -> Leftover:
    """Remove what `find` reports for the source, in one transaction; returns what it was."""
    with engine.begin() as conn:
        ddl_lock(conn)
        found = find(conn, source)
        for qualified in found.triggers:
            schema, table, trigger = qualified.split(".", 2)
            conn.execute(
                sa.text(
                    f"DROP TRIGGER IF EXISTS {quote_ident(trigger)} "
                    f"ON {quote_ident(schema)}.{quote_ident(table)}"
                )
            )
        conn.execute(sa.text(f"DROP FUNCTION IF EXISTS {capture_function(source)}()"))
        conn.execute(
            sa.text(
                f"""DELETE FROM {STATE_SCHEMA}.change_queue WHERE target IN (
                    SELECT target FROM {STATE_SCHEMA}.generations WHERE source = :s)"""
            ),
            {"s": source},
        )
        conn.execute(
            sa.text(f"DELETE FROM {STATE_SCHEMA}.staged_outputs WHERE {_OF_SOURCE}"),
            {"k": f"{source}/"},
        )
    return found
