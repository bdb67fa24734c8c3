"""Promotion, rollback and drop of a source's generations, and keeping readers on the live one.

- Promotion: once a building generation has no work left and its blocking checks pass over
  the whole generation (see `promotion_blockers`), one Postgres transaction makes it live,
  the old live one previous, and redefines the stable view; the Qdrant alias follows. The
  registry is the truth: a process killed between the view and the alias leaves the alias
  behind, and the next run, sensor tick or CLI call moves it (`converge_readers`).
- Rollback: a previous generation goes back to building, its change queue refilled by a
  full diff (writers held), and is promoted again once current.
- Drop: a previous (or abandoned) generation's table, state and collection are removed;
  automatically `generations.keep_previous_hours` after it was retired.
"""

import contextlib
import logging
from typing import Any

import sqlalchemy as sa

from embedding_assets.config.sources import SourceSpec
from embedding_assets.destinations.audit import audit_destinations
from embedding_assets.destinations.column_schema import (
    LOCK_NOT_AVAILABLE,
    drop_columns,
    swap_columns,
)
from embedding_assets.destinations.pg_relations import publish_view, relation_kind, view_reads
from embedding_assets.destinations.qdrant_store import QdrantStore
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.generations import (
    Generation,
    GenerationError,
    Generations,
    lock_registry,
)
from embedding_assets.sync.evaluation import quality_blocker
from embedding_assets.sync.generations import drop_generation_state, sibling_runtime
from embedding_assets.sync.runtime import SourceRuntime

log = logging.getLogger(__name__)

PROMOTION_SAMPLE = 20  # chunks that must each find themselves, in pgvector and in Qdrant
PROMOTION_K = 5
STILL_BUILDING = "still to do"  # the blocker of a build that is simply not finished


def promotion_blockers(runtime: SourceRuntime) -> list[str]:
    """Why the generation of `runtime` may not go live now; [] when it may. Over the whole
    generation: no work left (full coverage), no row failed that the live generation
    stores, every vector of the model's dimension and non-zero, pgvector and Qdrant equal
    to the ledger, and a sample of chunks finding themselves in both."""
    work = runtime.work()
    pending = {s: w.pending_rows for s, w in work.items() if w.pending_rows}
    lagging = {s: w.qdrant_lag_rows for s, w in work.items() if w.qdrant_lag_rows}
    if pending or lagging:
        return [
            f"{STILL_BUILDING}: {sum(pending.values())} rows to embed, "
            f"{sum(lagging.values())} rows to index (shards "
            f"{sorted(set(pending) | set(lagging))})"
        ]
    reasons = []
    failed, example = _new_failures(runtime)
    if failed:
        reasons.append(
            f"{failed} rows failed to embed in this generation that the live one stores "
            f"(e.g. {example}); `embedding-assets errors` lists them"
        )
    dimension = runtime.embedder.dimension
    spec = runtime.spec
    if spec.pgvector.enabled:
        invalid = runtime.pgvector.invalid_vectors(None, dimension)
        if invalid["wrong_dimension"] or invalid["zero_norm"]:
            reasons.append(
                f"{invalid['wrong_dimension']} vectors are not {dimension}-dimensional and "
                f"{invalid['zero_norm']} have a zero norm"
            )
    if runtime.column is not None:
        column = runtime.column.invalid_vectors(None, live=False)
        if column["missing_vectors"] or column["zero_norm"]:
            reasons.append(
                f"the write-back column lacks {column['missing_vectors']} rows' vectors and "
                f"has {column['zero_norm']} zero vectors"
            )
    with (
        runtime.qdrant.store.session(runtime.qdrant.collection)
        if spec.qdrant.enabled
        else contextlib.nullcontext()
    ):
        audits = audit_destinations(runtime, qdrant="count", deep=True)
        off = [a.shard for a in audits if not a.consistent]
        if off:
            reasons.append(f"pgvector or Qdrant disagree with the ledger in shards {off}")
        missing = _self_retrieval_misses(runtime) if spec.pgvector.enabled else []
    if runtime.column is not None:
        missing += [
            f"row {row} (write-back column)"
            for row in runtime.column.self_retrieval_misses(
                None, PROMOTION_SAMPLE, PROMOTION_K, live=False
            )
        ]
    if missing:
        reasons.append(
            f"{len(missing)} of the sampled chunks do not find themselves in their top "
            f"{PROMOTION_K}: {missing[:3]}"
        )
    if spec.generations.evaluate is not None:  # retrieval no worse than the live one's
        worse = quality_blocker(runtime, sibling_runtime(runtime, "live"))
        if worse:
            reasons.append(worse)
    return reasons


def _new_failures(runtime: SourceRuntime) -> tuple[int, str]:
    """Rows in this generation's error table that the live generation has no error for."""
    live = Generations(runtime.engine, runtime.spec.name).in_state("live")
    with runtime.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"""SELECT e.row_id, e.kind, e.message FROM {STATE_SCHEMA}.row_errors AS e
                WHERE e.target = :t AND NOT EXISTS (
                    SELECT 1 FROM {STATE_SCHEMA}.row_errors AS l
                    WHERE l.target = :live AND l.row_id = e.row_id)
                ORDER BY e.row_id"""
            ),
            {"t": runtime.target, "live": live.target if live is not None else ""},
        ).fetchall()
    if not rows:
        return 0, ""
    first = rows[0]
    return len(rows), f"row {first.row_id}: {first.kind}: {first.message[:200]}"


def _self_retrieval_misses(runtime: SourceRuntime) -> list[str]:
    sample = runtime.pgvector.sample_chunks(None, PROMOTION_SAMPLE)
    missing = []
    for row in sample.itertuples(index=False):
        pg_hits = runtime.pgvector.search(row.embedding, PROMOTION_K)
        in_pg = any(h.point_id == row.point_id or h.text == row.chunk_text for h in pg_hits)
        in_q = not runtime.spec.qdrant.enabled or any(
            h.id == row.point_id or h.payload.get("text") == row.chunk_text
            for h in runtime.qdrant.search(row.embedding, PROMOTION_K)
        )
        if not (in_pg and in_q):
            missing.append(f"row {row.row_id} ({'qdrant' if in_pg else 'pgvector'})")
    return missing


def promote(runtime: SourceRuntime, check: bool = True) -> list[str]:
    """Make the runtime's generation live if nothing blocks it; returns the blockers (and
    records them for `generations list`), [] once promoted."""
    generation = _require(runtime)
    registry = Generations(runtime.engine, runtime.spec.name)
    blockers = promotion_blockers(runtime) if check else []
    if blockers:
        if not blockers[0].startswith(STILL_BUILDING):
            registry.record_blocked(generation.number, "; ".join(blockers))
        return blockers
    try:
        _switch(runtime, registry, generation)
    except sa.exc.DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
            raise
        busy = (
            "the write-back column's table stayed locked by other transactions during the "
            "rename; promotion is tried again after the next write (or `generations promote`)"
        )
        registry.record_blocked(generation.number, busy)
        return [busy]
    log.info("generation %d of %s is live", generation.number, runtime.spec.name)
    converge_readers(runtime.engine, runtime.spec.name, runtime.stable_table,
                     runtime.stable_collection, runtime.qdrant.store)  # fmt: skip
    return []


def _switch(runtime: SourceRuntime, registry: Generations, generation: Generation) -> None:
    """One transaction: the registry, the view and the write-back columns move together."""
    with runtime.engine.begin() as conn:
        lock_registry(conn)
        current = registry.get(generation.number, conn)
        if current.state != "building":
            raise GenerationError(
                f"generation {generation.number} of {runtime.spec.name!r} is {current.state}, "
                "not building: only a building generation is promoted"
            )
        live = registry.in_state("live", conn)
        if live is not None:
            registry.set_state(conn, live.number, "previous")
        registry.set_state(conn, generation.number, "live")
        if runtime.pgvector.table_exists(conn):
            publish_view(conn, runtime.stable_table, generation.schema_table)
        # Readers of the write-back column switch with the view, in this transaction.
        swap_columns(conn, runtime.spec, live.number if live else None, generation.number)


def _require(runtime: SourceRuntime) -> Generation:
    if runtime.generation is None:
        raise GenerationError("this runtime belongs to no registered generation")
    return runtime.generation


def converge_readers(
    engine: sa.Engine,
    source: str,
    stable_table: tuple[str, str],
    stable_collection: str,
    store: QdrantStore,
    live: Generation | None = None,
) -> list[str]:
    """Point the stable view and (on a server) the Qdrant alias at the live generation
    (`live`, else read from the registry), if they are not already; returns what moved.
    One query when nothing has to (every sensor tick asks)."""
    if live is None:
        live = Generations(engine, source).in_state("live")
    if live is None:
        return []
    moved = []
    with engine.connect() as conn:
        stale = view_reads(conn, *stable_table) != live.pg_table
        # Until its first write the live generation has no table to show.
        stale = stale and relation_kind(conn, *live.schema_table) is not None
    if stale:
        with engine.begin() as conn:
            lock_registry(conn)
            live = Generations(engine, source).in_state("live", conn)
            if live is not None and relation_kind(conn, *live.schema_table) is not None:
                publish_view(conn, stable_table, live.schema_table)
                moved.append("view")
    if live is None or not store.supports_aliases or not store.collection_exists(live.collection):
        return moved
    aliased = store.alias_target(stable_collection)
    if aliased == live.collection:
        return moved
    if aliased is None and store.collection_exists(stable_collection):
        # A collection from before generations holds the stable name: it serves readers
        # until the live generation's own collection is complete, then gives way.
        if _qdrant_lags(engine, live.target):
            return moved
        store.delete_collection(stable_collection)
    store.point_alias(stable_collection, live.collection)
    return [*moved, "alias"]


def _qdrant_lags(engine: sa.Engine, target: str) -> bool:
    from embedding_assets.destinations.qdrant import LAGGING

    with engine.connect() as conn:
        return bool(
            conn.scalar(
                sa.text(
                    f"SELECT EXISTS (SELECT 1 FROM {STATE_SCHEMA}.row_state "
                    f"WHERE target = :t AND {LAGGING})"
                ),
                {"t": target},
            )
        )


def rollback(runtime: SourceRuntime, live_spec: SourceSpec) -> int:
    """Send a previous generation back to building, with its change queue refilled by a
    full diff; it goes live again once current (promote: auto). Returns the rows queued."""
    generation = _require(runtime)
    registry = Generations(runtime.engine, runtime.spec.name)
    with runtime.engine.begin() as conn:
        lock_registry(conn)
        generations = registry.all(conn, lock=True)
        current = next(g for g in generations if g.number == generation.number)
        if current.state != "previous":
            raise GenerationError(
                f"generation {current.number} of {live_spec.name!r} is {current.state}; only "
                "a previous generation can be rolled back to"
            )
        building = next((g for g in generations if g.state == "building"), None)
        if building is not None:
            raise GenerationError(
                f"generation {building.number} of {live_spec.name!r} is being built; drop it "
                f"first (`embedding-assets generations drop --source {live_spec.name} "
                f"--generation {building.number}`, after setting sources.yaml back) or let it "
                "finish"
            )
        registry.set_state(conn, current.number, "building", promote="auto")
    runtime.generation = registry.get(generation.number)
    return runtime.feed.catch_up()


def drop(runtime: SourceRuntime, configured_key: str) -> None:
    """Remove a generation that is not live: its table, state rows and collection."""
    generation = _require(runtime)
    registry = Generations(runtime.engine, runtime.spec.name)
    with runtime.engine.begin() as conn:
        lock_registry(conn)
        current = registry.get(generation.number, conn)
        if current.state == "live":
            raise GenerationError(
                f"generation {current.number} of {runtime.spec.name!r} is live; promote or "
                "roll back to another first"
            )
        if current.pipeline_key == configured_key:
            raise GenerationError(
                f"generation {current.number} is what sources.yaml asks for, so it would be "
                "built again at once; set sources.yaml to the live generation's model, "
                "template and chunking first, then drop it"
            )
        if current.state != "dropped":
            drop_generation_state(conn, registry, current)
            drop_columns(conn, runtime.spec, current.number)
    sweep_dropped(runtime.engine, runtime.spec.name, runtime.qdrant.store)


def sweep_dropped(engine: sa.Engine, source: str, store: QdrantStore) -> list[str]:
    """Delete the Qdrant collections dropped generations left (a drop of an embedded store's
    collection waits for its lock, so it happens where the store is held)."""
    generations = Generations(engine, source).all()
    kept = {g.collection for g in generations if g.state != "dropped"}
    removed = []
    for generation in generations:
        if generation.state != "dropped" or generation.collection in kept:
            continue
        if store.collection_exists(generation.collection) and (
            store.alias_target(generation.collection) is None
        ):
            try:
                store.delete_collection(generation.collection)
            except RuntimeError as exc:  # open in this process (a CLI sync): next time
                log.info("collection %s not removed yet: %s", generation.collection, exc)
                continue
            removed.append(generation.collection)
    return removed


def expire_previous(runtime: SourceRuntime) -> list[int]:
    """Drop previous generations retired more than `keep_previous_hours` ago."""
    registry = Generations(runtime.engine, runtime.spec.name)
    expired = registry.expired(runtime.spec.generations.keep_previous_hours)
    for generation in expired:
        with runtime.engine.begin() as conn:
            lock_registry(conn)
            if registry.get(generation.number, conn).state == "previous":
                drop_generation_state(conn, registry, generation)
                drop_columns(conn, runtime.spec, generation.number)
    return [g.number for g in expired]


def finish_build(runtime: SourceRuntime, logger=log) -> dict[str, Any]:
    """A building generation (a new model, or a rollback target) whose rows are all stored
    is checked and promoted by whoever looks next: a sync, a sensor tick, a run. Without
    this, a build whose last write committed but whose promotion was cut off (a kill, a
    crash) would wait for the next changed row. Nothing for a live generation."""
    if runtime.generation is None or runtime.generation.state != "building":
        return {}
    return after_index_write(runtime, logger)


def after_index_write(runtime: SourceRuntime, logger=log) -> dict[str, Any]:
    """What follows a shard's Qdrant write: promote a finished auto build, keep readers on
    the live generation, drop expired previous ones and sweep their collections."""
    outcome: dict[str, Any] = {}
    generation = runtime.generation
    if generation is None:
        return outcome
    current = Generations(runtime.engine, runtime.spec.name).get(generation.number)
    runtime.generation = current
    if current.state == "building" and current.promote == "auto":
        blockers = promote(runtime)
        if not blockers:
            outcome["promoted_generation"] = current.number
            logger.info(
                f"generation {current.number} of {runtime.spec.name} is complete and passed "
                "its checks: it is live now"
            )
        elif not blockers[0].startswith(STILL_BUILDING):
            outcome["promotion_blocked"] = "; ".join(blockers)
            logger.warning(
                f"generation {current.number} of {runtime.spec.name} is complete but not "
                f"promoted: {'; '.join(blockers)}"
            )
    expired = expire_previous(runtime)
    if expired:
        outcome["dropped_generations"] = expired
    swept = sweep_dropped(runtime.engine, runtime.spec.name, runtime.qdrant.store)
    moved = converge_readers(
        runtime.engine,
        runtime.spec.name,
        runtime.stable_table,
        runtime.stable_collection,
        runtime.qdrant.store,
    )
    if swept:
        outcome["collections_removed"] = swept
    if moved:
        outcome["readers_moved"] = moved
    return outcome
