"""Builds the plain objects a source needs from settings: its embedder, ledger, change feed
and destinations, as one `SourceRuntime`.

Shared by resources, IO managers, the sensor, checks and the CLI, so all of them agree on
the model id, pipeline version and capture mode of a source.
"""

import functools
import hashlib
from dataclasses import dataclass, field

import sqlalchemy as sa

from embedding_assets.config.sources import SourceSpec
from embedding_assets.destinations.audit import ShardAudit, audit_destinations
from embedding_assets.destinations.base import (
    Destination,
    FollowingDestination,
    TransactionalDestination,
)
from embedding_assets.destinations.column import ColumnDestination
from embedding_assets.destinations.pg_relations import publish_view
from embedding_assets.destinations.pgvector import PgVectorDestination
from embedding_assets.destinations.qdrant import QdrantDestination
from embedding_assets.destinations.qdrant_store import QdrantStore
from embedding_assets.embedders.base import Embedder
from embedding_assets.state.budget import TokenBudget
from embedding_assets.state.capture import build_feed
from embedding_assets.state.db import engine_for
from embedding_assets.state.ddl import ddl_lock
from embedding_assets.state.diff import ShardWork, SourceDiff
from embedding_assets.state.errors import RowErrors
from embedding_assets.state.feeds import ChangeFeed
from embedding_assets.state.generations import Generation, GenerationError
from embedding_assets.state.ledger import Ledger, pipeline_version
from embedding_assets.state.privileges import require_privileges
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.vector_cache import VectorCache


@dataclass
class SourceRuntime:
    """Everything one source needs at run time, built in one place (`source_runtime`) and
    shared by assets, checks, the sensor, IO managers and the CLI, so all of them agree on
    the model id, pipeline version, change feed and destinations of the source."""

    spec: SourceSpec
    engine: sa.Engine
    embedder: Embedder
    version: str
    ledger: Ledger
    diff: SourceDiff
    feed: ChangeFeed
    pgvector: PgVectorDestination
    qdrant: QdrantDestination
    target: str
    # The generation this runtime syncs; None for a runtime built outside the registry
    # (`plan` of a generation that does not exist yet).
    generation: Generation | None = None
    # The names readers use: the view over the live generation's table, the Qdrant alias.
    stable_table: tuple[str, str] = ("public", "")
    stable_collection: str = ""
    # Tables of the source's other generations with the same model: vectors to copy.
    same_model_tables: tuple[tuple[str, str], ...] = ()
    # The embedder's name in sources.yaml and its daily token budget (None: no budget).
    embedder_name: str = ""
    tokens_per_day: int | None = None
    target_ready: bool = False
    # When this runtime last found its store in line with sources.yaml (`sync.config_edits`;
    # time.monotonic(), -inf: never).
    config_checked_at: float = float("-inf")
    # The role's privileges were found sufficient (`state.privileges`), once per process.
    privileges_checked: bool = False
    # The write-back column (write_back: in sources.yaml), None without one.
    column: ColumnDestination | None = None
    _claims: dict[int, sa.Connection] = field(default_factory=dict, repr=False)

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    @property
    def transactional(self) -> list[TransactionalDestination]:
        """Destinations written in the ledger's transaction, in write order: the chunk table
        first (it may refuse a row's values; the others then leave that row as it was)."""
        found: list[TransactionalDestination] = []
        if self.spec.pgvector.enabled:
            found.append(self.pgvector)
        if self.column is not None:
            found.append(self.column)
        return found

    @property
    def following(self) -> list[FollowingDestination]:
        """Destinations written after the ledger's transaction, from what it says they lack."""
        return [self.qdrant] if self.spec.qdrant.enabled else []

    @property
    def destinations(self) -> list[Destination]:
        return [*self.transactional, *self.following]

    @property
    def is_live(self) -> bool:
        """Whether this runtime's generation was live when it was built (writes re-check
        under a lock; this is for reads)."""
        return self.generation is None or self.generation.state == "live"

    @property
    def number(self) -> int | None:
        return self.generation.number if self.generation is not None else None

    @property
    def errors(self) -> RowErrors:
        return self.feed.errors

    @functools.cached_property
    def budget(self) -> TokenBudget:
        return TokenBudget(
            self.engine, self.embedder_name or self.spec.embedder, self.tokens_per_day
        )

    @functools.cached_property
    def vector_cache(self) -> VectorCache:
        return VectorCache(self.engine, self.target, self.model_id)

    def ensure_target(self, dimension: int) -> None:
        """Record the target for this model (or refuse another model's table), create the
        chunk table, and follow a change of the shard count, in one transaction."""
        if self.target_ready:
            return
        with self.engine.begin() as conn:
            ddl_lock(conn)
            self.require_kept(conn)
            # Without a chunk table (a column-only source) there is no table or view.
            chunk_table = self.spec.pgvector.enabled
            created = chunk_table and self.pgvector.ensure(conn, dimension)
            added = [] if created or not chunk_table else self.pgvector.add_metadata_columns(conn)
            lexical = chunk_table and self.pgvector.ensure_lexical(conn)
            live = self.generation is not None and self.generation.state == "live"
            if (created or added or lexical) and live:  # the view shows new columns too
                publish_view(conn, self.stable_table, self.spec.pg_table)
            recorded = self.ledger.claim_target(
                conn,
                self.model_id,
                dimension,
                self.spec.shards,
                self.spec.qdrant_collection,
                vector_index="deferred" if created else "built",
            )
            if recorded is not None and recorded.shards != self.spec.shards:
                self.ledger.reshard(conn, self.spec.shards)
                if chunk_table:
                    self.pgvector.reshard(conn, self.spec.shards)
                ChangeQueue(self.engine, self.target).reshard(conn, self.spec.shards)
        self.vector_cache.prune()
        self.target_ready = True

    def require_privileges(self) -> None:
        """Before the first embedder call: what the role lacks stops the run with the SQL
        that grants it (checked once per runtime and process)."""
        if not self.privileges_checked:
            require_privileges(self.engine, self.spec)
            self.privileges_checked = True

    def require_kept(self, conn: sa.Connection) -> str:
        """Refuse to write a generation that was dropped after this runtime was built.
        Returns its state now, held (FOR SHARE) until the caller's transaction ends, so a
        promotion waits for the write: which write-back column is this generation's
        depends on it."""
        if self.generation is None:
            return "live"
        state = conn.scalar(
            sa.text("SELECT state FROM embedding_assets.generations WHERE target = :t FOR SHARE"),
            {"t": self.target},
        )
        if state in (None, "dropped"):
            raise GenerationError(
                f"generation {self.generation.number} of source {self.spec.name!r} was "
                "dropped; nothing is written to it. Runs of the source's live or building "
                "generation continue."
            )
        return state

    def claim_shard(self, shard: int, on_wait=None) -> None:
        """Hold the shard until this run's write commits (or its process ends): a second
        run of the same shard waits here, then finds the work done, so no row is embedded
        twice. A session advisory lock on its own connection; Postgres drops it with the
        connection if the process dies."""
        if self.try_claim_shard(shard):
            return
        if on_wait is not None:
            on_wait()
        conn = self.engine.connect()
        conn.execute(sa.text("SELECT pg_advisory_lock(hashtext(:k), :s)"), self._claim_key(shard))
        conn.commit()
        self._claims[shard] = conn

    def try_claim_shard(self, shard: int) -> bool:
        """The claim if nobody holds it, at once; False (nothing held) if a run does."""
        if shard in self._claims:
            return True
        conn = self.engine.connect()
        key = self._claim_key(shard)
        if not conn.scalar(sa.text("SELECT pg_try_advisory_lock(hashtext(:k), :s)"), key):
            conn.close()
            return False
        conn.commit()
        self._claims[shard] = conn
        return True

    def _claim_key(self, shard: int) -> dict:
        return {"k": f"{self.target}#claim", "s": shard}

    def release_shard(self, shard: int) -> None:
        conn = self._claims.pop(shard, None)
        if conn is not None:
            conn.invalidate()  # closing the session is what releases its advisory locks

    def release_claims(self) -> None:
        for shard in list(self._claims):
            self.release_shard(shard)

    def work(self, ensure: bool = True) -> dict[int, ShardWork]:
        """Per shard: pending rows and Qdrant lag from the change feed and the ledger's
        lag index. Cost follows the changes (for trigger and watermark feeds). Read-only
        callers pass `ensure=False`: capture is then neither installed nor seeded."""
        pending = self.feed.work(ensure)
        lag = self.qdrant.lag_by_shard()
        work = {}
        for shard in range(self.spec.shards):
            rows, feed_print = pending.get(shard, (0, None))
            lag_rows, lag_print = lag.get(shard, (0, None))
            fingerprint = None
            if rows or lag_rows:
                fingerprint = hashlib.md5(f"{feed_print}|{lag_print}".encode()).hexdigest()
            work[shard] = ShardWork(shard, rows, lag_rows, fingerprint)
        return work

    def reconcile(self) -> tuple[int, list[ShardAudit]]:
        """Queue what a full diff finds the change feed missed, and compare both sinks with
        the ledger in full (counted, checksummed), marking what they lost for repair; rows
        whose write-back vector is missing are queued too. Returns the rows queued and the
        shards repaired."""
        found = self.feed.reconcile()
        audits = audit_destinations(self, qdrant="count", deep=True)
        if self.column is not None and self.is_live:  # vectors NULLed in the column by hand
            found += self.column.repair(None, enqueue=self.feed.mode != "diff").rows_pending
        return found, [a for a in audits if a.repaired]

    def exact_work(self, shard: int | None = None) -> dict[int, ShardWork]:
        """The full diff: exact eligible, current and pending counts. Cost: the table."""
        return self.diff.exact_work(shard)


_RUNTIMES: dict[tuple, SourceRuntime] = {}


def source_runtime(
    spec: SourceSpec,
    database_url: str,
    embedder: Embedder,
    qdrant: QdrantStore,
    generation: Generation | None = None,
    stable: tuple[tuple[str, str], str] | None = None,
    watched_extra: tuple[str, ...] = (),
    same_model_tables: tuple[tuple[str, str], ...] = (),
    embedder_name: str = "",
    tokens_per_day: int | None = None,
) -> SourceRuntime:
    """The one place a source's runtime is built; one per configuration and process.
    `spec` is the generation's (its own table, collection, template and chunking)."""
    target = generation.target if generation is not None else spec.target
    key = (
        spec.model_dump_json(),
        database_url,
        id(embedder),
        id(qdrant),
        target,
        generation.state if generation is not None else None,
        watched_extra,
        same_model_tables,
        embedder_name,
        tokens_per_day,
    )
    if key not in _RUNTIMES:
        engine = engine_for(database_url)
        version = pipeline_version(
            embedder.model_id, spec.chunking.max_tokens, spec.chunking.overlap
        )
        ledger = Ledger(engine, target, spec.name, version, with_qdrant=spec.qdrant.enabled)
        diff = SourceDiff(engine, spec, target, version)
        pgvector = PgVectorDestination(engine, spec, ledger)
        stable_table, stable_collection = stable or (spec.pg_table, spec.qdrant_collection)
        _RUNTIMES[key] = SourceRuntime(
            spec=spec,
            engine=engine,
            embedder=embedder,
            version=version,
            ledger=ledger,
            diff=diff,
            feed=build_feed(engine, spec, diff, watched_extra),
            pgvector=pgvector,
            qdrant=QdrantDestination(engine, spec, target, qdrant, pgvector),
            target=target,
            generation=generation,
            stable_table=stable_table,
            stable_collection=stable_collection,
            same_model_tables=same_model_tables,
            embedder_name=embedder_name,
            tokens_per_day=tokens_per_day,
            column=(
                ColumnDestination(
                    engine, spec, target, generation.number if generation is not None else 1
                )
                if spec.write_back is not None
                else None
            ),
        )
    return _RUNTIMES[key]


def release_all_claims() -> None:
    """End of a run: whatever shard claims it still holds (a failed step) are let go."""
    for runtime in _RUNTIMES.values():
        runtime.release_claims()
