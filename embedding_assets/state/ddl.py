"""The `embedding_assets` schema in the data database: ledger, change queue, capture state.

- `targets`: one row per pgvector target (source generation): model, dimension, shards.
- `row_state`: the ledger, one row per (target, source row): the content hash, pipeline
  version and chunk count that pgvector holds, and what Qdrant holds. Durable truth that
  every destination is reconciled against.
- `change_queue`: row ids with possible work, per target and shard, appended by capture
  triggers and by reconciliation; a run deletes the entries it consumed in the same
  transaction as its ledger write.
- `capture`: per target, how changes are captured (mode, installed trigger signature,
  watermarks per shard, last reconciliation).
- `shard_counts`: per target and shard, the eligible-row count of the last full diff, so
  status can report it without rescanning the source.
- `row_errors`: per (target, source row), the last failure to embed the row's content: kind,
  message, attempts, when to retry, and whether it is dead (see `state.errors`).
- `token_usage`: per embedder and UTC day, the tokens sent to it (`max_tokens_per_day`).
- `generations`: the generation registry (see `state.generations`).
- `staged_outputs`: intermediate stage outputs (see `state.staging`).
- `applied_config`, `schema_version`: see `state.migrations` (every change of these tables
  is a migration there).
- `vector_cache`: vectors a long run computed and has not stored yet, so an interrupted run
  keeps its progress (see `state.vector_cache`); without a chunk table, every chunk vector,
  with `row_chunks` saying which rows use it.
"""

import sqlalchemy as sa

from embedding_assets.state.source_sql import quote_ident

STATE_SCHEMA = "embedding_assets"
DDL_LOCK = "embedding_assets.ddl"

# Migration 1 (`state.migrations`): never edited, only followed by new migrations.
STATE_DDL = f"""
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.targets (
    target text PRIMARY KEY,
    source text NOT NULL,
    model text NOT NULL,
    dimension int NOT NULL,
    shards int NOT NULL,
    qdrant_collection text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE {STATE_SCHEMA}.targets ADD COLUMN IF NOT EXISTS vector_index text NOT NULL
    DEFAULT 'built';  -- pgvector HNSW: 'built' | 'deferred' (a bulk load builds it at the end)
-- The last recall measurement of the approximate searches (see destinations.recall).
ALTER TABLE {STATE_SCHEMA}.targets ADD COLUMN IF NOT EXISTS recall jsonb;
ALTER TABLE {STATE_SCHEMA}.targets ADD COLUMN IF NOT EXISTS recall_measured_at timestamptz;
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.row_state (
    target text NOT NULL,
    row_id text NOT NULL,
    shard int NOT NULL,
    content_hash text,             -- what pgvector holds; NULL once the row is deleted
    version text NOT NULL,         -- model and chunking that produced the chunks
    chunk_count int NOT NULL,
    pg_synced_at timestamptz NOT NULL,
    deleted boolean NOT NULL DEFAULT false,
    qdrant_hash text,              -- content_hash of the points Qdrant holds
    qdrant_chunk_count int NOT NULL DEFAULT 0,  -- upper bound of the row's points in Qdrant
    PRIMARY KEY (target, row_id)
);
CREATE INDEX IF NOT EXISTS row_state_target_shard ON {STATE_SCHEMA}.row_state (target, shard);
-- Only rows Qdrant lags on: finding them costs O(lagging rows), not O(ledger).
CREATE INDEX IF NOT EXISTS row_state_qdrant_lag ON {STATE_SCHEMA}.row_state (target, shard)
    WHERE qdrant_hash IS DISTINCT FROM content_hash OR qdrant_chunk_count <> chunk_count;
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.change_queue (
    id bigserial PRIMARY KEY,
    target text NOT NULL,
    shard int NOT NULL,
    row_id text NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS change_queue_target_shard
    ON {STATE_SCHEMA}.change_queue (target, shard, id);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.capture (
    target text PRIMARY KEY,
    mode text NOT NULL,
    signature text,                -- of the installed trigger SQL; NULL when none
    installed_at timestamptz,
    reconciled_at timestamptz,
    reconcile_found int
);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.watermarks (
    target text NOT NULL,
    shard int NOT NULL,
    value text NOT NULL,           -- max watermark column value consumed, as text
    PRIMARY KEY (target, shard)
);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.row_errors (
    target text NOT NULL,
    row_id text NOT NULL,
    shard int NOT NULL,
    content_hash text NOT NULL,    -- the content that failed; another content is tried anew
    kind text NOT NULL,            -- rejected | transient | bad_output
    message text NOT NULL,
    attempts int NOT NULL,
    first_failed_at timestamptz NOT NULL,
    last_failed_at timestamptz NOT NULL,
    next_retry_at timestamptz,     -- NULL: dead, or already queued for its retry
    state text NOT NULL,           -- retrying | dead
    PRIMARY KEY (target, row_id)
);
CREATE INDEX IF NOT EXISTS row_errors_due ON {STATE_SCHEMA}.row_errors (target, next_retry_at)
    WHERE next_retry_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.vector_cache (
    target text NOT NULL,
    model text NOT NULL,
    chunk_hash text NOT NULL,
    embedding vector NOT NULL,     -- any dimension: the model's
    cached_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target, model, chunk_hash)
);
-- Without a chunk table (a column-only source), which chunks each row has: the vector cache
-- is then the store of chunk vectors, and an entry no row refers to any more is removed.
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.row_chunks (
    target text NOT NULL,
    row_id text NOT NULL,
    chunk_index int NOT NULL,
    chunk_hash text NOT NULL,
    PRIMARY KEY (target, row_id, chunk_index)
);
CREATE INDEX IF NOT EXISTS row_chunks_hash ON {STATE_SCHEMA}.row_chunks (target, chunk_hash);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.token_usage (
    embedder text NOT NULL,        -- the embedder's name in sources.yaml
    day date NOT NULL,             -- UTC
    tokens bigint NOT NULL,
    PRIMARY KEY (embedder, day)
);
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.shard_counts (
    target text NOT NULL,
    shard int NOT NULL,
    eligible_rows bigint NOT NULL,
    counted_at timestamptz NOT NULL,
    PRIMARY KEY (target, shard)
);
"""

# Migration 2: the generations registry (see `state.generations`).
GENERATIONS_DDL = f"""
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.generations (
    source text NOT NULL,
    number int NOT NULL,
    target text NOT NULL UNIQUE,    -- the ledger key of this generation's state
    pg_table text NOT NULL,         -- schema.table of its chunk table
    collection text NOT NULL,       -- its Qdrant collection
    pipeline_key text NOT NULL,     -- hash of what shapes its vectors (see pipeline_key)
    pipeline jsonb NOT NULL,        -- that pipeline: embedder spec, template, chunking
    model text NOT NULL,
    state text NOT NULL,            -- building | live | previous | dropped
    promote text NOT NULL,          -- auto | manual
    created_at timestamptz NOT NULL DEFAULT now(),
    promoted_at timestamptz,
    retired_at timestamptz,
    dropped_at timestamptz,
    blocked_reason text,            -- why the last promotion attempt refused, if it did
    blocked_at timestamptz,
    PRIMARY KEY (source, number)
);
-- One live and one building generation per source, enforced by the database.
CREATE UNIQUE INDEX IF NOT EXISTS generations_one_live ON {STATE_SCHEMA}.generations (source)
    WHERE state = 'live';
CREATE UNIQUE INDEX IF NOT EXISTS generations_one_building
    ON {STATE_SCHEMA}.generations (source) WHERE state = 'building';
"""

# Migration 3: stage outputs kept between steps (see `state.staging`).
STAGING_DDL = f"""
CREATE TABLE IF NOT EXISTS {STATE_SCHEMA}.staged_outputs (
    asset_key text NOT NULL,
    partition_key text NOT NULL,
    run_id text,
    payload bytea NOT NULL,
    stored_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (asset_key, partition_key)
)"""


def schema_exists(conn: sa.Connection, schema: str) -> bool:
    return bool(
        conn.scalar(
            sa.text("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = :s)"),
            {"s": schema},
        )
    )


def ensure_schema(conn: sa.Connection, schema: str) -> None:
    """Create a schema only when it does not exist: `CREATE SCHEMA IF NOT EXISTS` needs
    CREATE on the database even for a schema a DBA already made for this role."""
    if not schema_exists(conn, schema):
        conn.execute(sa.text(f"CREATE SCHEMA {quote_ident(schema)}"))


# The readers' views refuse writes through this (destinations.reader_view).
REFUSE_READER_WRITE = f"{STATE_SCHEMA}.refuse_reader_write"


def execute_script(conn: sa.Connection, sql: str) -> None:
    """Run SQL text as is (several statements, `%` operators) on the connection's driver."""
    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(sql)
    finally:
        cursor.close()


def ddl_lock(conn: sa.Connection) -> None:
    """Serialise DDL of this project across processes, until the transaction ends."""
    conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": DDL_LOCK})


def shard_lock(conn: sa.Connection, target: str, shard: int) -> None:
    """One writer per (target, shard) at a time, until the transaction ends."""
    conn.execute(
        sa.text("SELECT pg_advisory_xact_lock(hashtext(:t), :s)"), {"t": target, "s": shard}
    )
