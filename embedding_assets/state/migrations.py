"""Our own tables change only through these migrations, in order, each applied once.

`embedding_assets.schema_version` records which are applied. Whichever process touches the
state schema first applies the missing ones, under the DDL advisory lock, in one
transaction; a process that finds them all applied writes nothing. A store written before
the version table existed (up to commit 0f72d97) has every table of migrations 1-3
already: their DDL is idempotent (`IF NOT EXISTS`), so it is adopted as it is and nothing is
embedded again. A new table or column of ours is a new entry at the end, never an edit of
an old one.
"""

from dataclasses import dataclass

import sqlalchemy as sa

from embedding_assets.state.ddl import (
    GENERATIONS_DDL,
    REFUSE_READER_WRITE,
    STAGING_DDL,
    STATE_DDL,
    STATE_SCHEMA,
    ddl_lock,
    ensure_schema,
    execute_script,
)

APPLIED_CONFIG_DDL = f"""
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.applied_config (
    target text PRIMARY KEY,       -- a generation's ledger key
    config jsonb NOT NULL,         -- values of the keys whose edit changes the store
    fingerprints jsonb NOT NULL,   -- per effect class (config.effects)
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

KEPT_VECTORS_DDL = f"""
-- NULL: a run's progress, kept until stored. Set: vectors of rows that left the source's
-- `where` (or query), kept until then so a row that comes back is not embedded again.
ALTER TABLE {STATE_SCHEMA}.vector_cache ADD COLUMN IF NOT EXISTS kept_until timestamptz;
"""

LIVE_LANES_DDL = f"""
-- One row per running live lane (`embedding-assets live`): its heartbeat tells the sensor
-- whether to leave fresh changes to it, and `status` and the source asset show its health.
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.live_lanes (
    lane text PRIMARY KEY,               -- host:pid
    sources text[] NOT NULL,             -- the sources it serves
    started_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    last_write_at timestamptz,
    rows_written bigint NOT NULL DEFAULT 0,
    backlog int NOT NULL DEFAULT 0,      -- rows it was notified of and has not written yet
    last_error text
);
"""

READER_VIEW_DDL = f"""
CREATE OR REPLACE FUNCTION {REFUSE_READER_WRITE}() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is the read-only readers'' view of an embedding_assets source',
        TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'object_not_in_prerequisite_state',
            HINT = 'embedding_assets writes it from the source table: insert, update or '
                'delete rows there, and their chunks follow';
END
$$;
"""

WRITE_COUNTS_DDL = f"""
-- Cumulative counts of what the store step did, per generation's ledger key and shard (one
-- writer per shard at a time, so no two writes wait on one row), for /metrics' counters.
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.write_counts (
    target text NOT NULL,
    shard int NOT NULL,
    rows_embedded bigint NOT NULL DEFAULT 0,  -- rows stored with their vectors
    rows_deleted bigint NOT NULL DEFAULT 0,
    rows_failed bigint NOT NULL DEFAULT 0,    -- failed attempts recorded in row_errors
    rows_dead bigint NOT NULL DEFAULT 0,      -- rows that turned dead
    last_write_at timestamptz,
    PRIMARY KEY (target, shard)
);
"""

VERSION_DDL = f"""
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.schema_version (
    version int PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""


class SchemaVersionError(RuntimeError):
    """The state schema was written by a newer version of this tool."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS = (
    Migration(1, "ledger, change queue, capture, errors, caches (as of 0f72d97)", STATE_DDL),
    Migration(2, "generations registry", GENERATIONS_DDL),
    Migration(3, "staged stage outputs", STAGING_DDL),
    Migration(4, "applied configuration per generation", APPLIED_CONFIG_DDL),
    Migration(5, "vectors kept for rows that left the eligible set", KEPT_VECTORS_DDL),
    Migration(6, "live lanes' heartbeats", LIVE_LANES_DDL),
    Migration(7, "readers' views refuse writes", READER_VIEW_DDL),
    Migration(8, "cumulative write counts for metrics", WRITE_COUNTS_DDL),
)
LATEST = MIGRATIONS[-1].version

_MIGRATED: set[str] = set()  # database URLs this process found up to date


def schema_version(conn: sa.Connection) -> int | None:
    """The newest applied migration; None before the version table existed."""
    exists = conn.scalar(
        sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": f"{STATE_SCHEMA}.schema_version"}
    )
    if not exists:
        return None
    return conn.scalar(sa.text(f"SELECT max(version) FROM {STATE_SCHEMA}.schema_version"))


def migrate(engine: sa.Engine) -> list[int]:
    """Apply the migrations this database lacks; returns their versions ([] when none)."""
    key = engine.url.render_as_string(hide_password=False)
    if key in _MIGRATED:
        return []
    with engine.connect() as conn:
        found = schema_version(conn)
    _refuse_newer(found)
    applied: list[int] = []
    if found != LATEST:
        with engine.begin() as conn:
            ddl_lock(conn)
            applied = _apply_missing(conn)
    _MIGRATED.add(key)
    return applied


def _refuse_newer(version: int | None) -> None:
    if version is not None and version > LATEST:
        raise SchemaVersionError(
            f"the {STATE_SCHEMA} schema is at version {version}, written by a newer "
            f"embedding-assets than this one (which knows up to {LATEST}); upgrade this "
            "installation (pip install -U embedding-assets) instead of running an older one"
        )


def _apply_missing(conn: sa.Connection) -> list[int]:
    # Only when missing: a DBA may have created it for a role without CREATE.
    ensure_schema(conn, STATE_SCHEMA)
    execute_script(conn, VERSION_DDL)
    done = set(conn.scalars(sa.text(f"SELECT version FROM {STATE_SCHEMA}.schema_version")))
    _refuse_newer(max(done, default=None))
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        execute_script(conn, migration.sql)
        conn.execute(
            sa.text(f"INSERT INTO {STATE_SCHEMA}.schema_version (version, name) VALUES (:v, :n)"),
            {"v": migration.version, "n": migration.name},
        )
        applied.append(migration.version)
    return applied


def dba_sql(role: str) -> str:
    """Our schema at this version, for a DBA to run for `role` (the tool's), which then
    needs no CREATE anywhere: the tables, their version rows (so the tool applies nothing),
    and the role's grants on them."""
    who = '"' + role.replace('"', '""') + '"'
    versions = "\n".join(
        f"INSERT INTO {STATE_SCHEMA}.schema_version (version, name) VALUES "
        f"({m.version}, '{m.name.replace(chr(39), chr(39) * 2)}') ON CONFLICT DO NOTHING;"
        for m in MIGRATIONS
    )
    return "\n".join(
        [
            f"CREATE SCHEMA IF NOT EXISTS {STATE_SCHEMA};",
            VERSION_DDL.strip(),
            *(m.sql.strip().rstrip(";") + ";" for m in MIGRATIONS),
            versions,
            f"GRANT USAGE, CREATE ON SCHEMA {STATE_SCHEMA} TO {who};",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {STATE_SCHEMA} "
            f"TO {who};",
            f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA {STATE_SCHEMA} TO {who};",
        ]
    )
