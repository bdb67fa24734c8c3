"""Which generation of a source a caller works on, and registering new ones.

A source's pipeline (see `pipeline_identity`) picks its generation: the first time a
pipeline is seen, a generation is registered for it, live if the source has none live,
else building beside the live one. Every generation is synced by the same code through its
own runtime (`generation_runtime`), built from the configured source with the generation's
own table, collection, template, chunking and embedder. State from before generations
existed becomes generation 1 as it is (see `_adopt`).
"""

import functools
import json
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter

from embedding_assets.config.base import template_fields
from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.settings import Settings
from embedding_assets.config.sources import ChunkingSpec, SourceSpec
from embedding_assets.core.chunking import TEXT_RULES_VERSION
from embedding_assets.destinations.pg_relations import adopt_table, relation_kind
from embedding_assets.destinations.qdrant_store import QdrantStore
from embedding_assets.embedders.base import Embedder
from embedding_assets.embedders.build import make_embedder
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.generations import (
    KEPT_STATES,
    POSTGRES_NAME_LIMIT,
    Generation,
    GenerationError,
    Generations,
    forget_target,
    generation_name,
    lock_registry,
    pipeline_key,
)
from embedding_assets.state.ledger import Ledger
from embedding_assets.state.source_sql import quote_table
from embedding_assets.sync.runtime import SourceRuntime, source_runtime

_EMBEDDER_SPEC = TypeAdapter(EmbedderSpec)


# The Qdrant collection's sparse vector, and the language its terms are in: a collection
# cannot gain a named vector, and terms of another language mean another vector.
QDRANT_LEXICAL = "qdrant_lexical"


def pipeline_identity(spec: SourceSpec, embedder_spec: EmbedderSpec, model_id: str) -> dict:
    """Everything that changes a source's vectors: the model (its id carries the precision),
    the requested output dimension, the text template, the chunking and the text rules, and
    with Qdrant and hybrid search on, the language of the collection's sparse vectors.
    Metadata, filters, limits and endpoints are not in it: changing them builds nothing
    (`config.effects` says what each key does). A remote embedder's `tokenizer` cuts the
    chunks, so it is part of it once set (absent, the key of existing generations stays)."""
    tokenizer = getattr(embedder_spec, "tokenizer", None)
    lexical = spec.qdrant.enabled and spec.hybrid.enabled
    return {
        "model": model_id,
        "dimensions": getattr(embedder_spec, "dimensions", None),
        "text": spec.text,
        "chunking": {"max_tokens": spec.chunking.max_tokens, "overlap": spec.chunking.overlap},
        "text_rules": TEXT_RULES_VERSION,
        **({"tokenizer": tokenizer} if tokenizer else {}),
        **({QDRANT_LEXICAL: spec.hybrid.language} if lexical else {}),
    }


def pipeline_record(spec: SourceSpec, embedder_spec: EmbedderSpec, model_id: str) -> dict:
    """What a generation stores: its identity, and the embedder spec that rebuilds its
    embedder once sources.yaml has moved on (the live generation keeps following changes)."""
    return {
        **pipeline_identity(spec, embedder_spec, model_id),
        "embedder_name": spec.embedder,
        "embedder": embedder_spec.model_dump(mode="json"),
    }


def config_key(spec: SourceSpec, embedder_spec: EmbedderSpec, model_id: str) -> str:
    return pipeline_key(pipeline_identity(spec, embedder_spec, model_id))


def serves_as_is(generation: Generation, identity: dict, store: QdrantStore) -> bool:
    """Whether `generation`, of another pipeline key, differs from `identity` only in its
    Qdrant lexical side and its collection serves that side as it is, so the configured
    pipeline is it (recorded by `ensure_generation`) and nothing is built: hybrid turned off
    (sparse vectors left in a collection cost nothing), Qdrant turned on (the collection is
    made with them), or a collection that already has them (made before the side was part of
    the key, in the configured language). A collection without them, or with terms in
    another language, needs a new generation: a Qdrant collection cannot gain a vector."""
    had = generation.pipeline.get(QDRANT_LEXICAL)
    base = {k: v for k, v in identity.items() if k != QDRANT_LEXICAL}
    if generation.pipeline_key != pipeline_key({**base, **({QDRANT_LEXICAL: had} if had else {})}):
        return False
    wanted = identity.get(QDRANT_LEXICAL)
    if wanted is None:
        return True
    if had is not None:  # terms in another language
        return False
    exists = store.collection_exists(generation.collection)
    return not exists or store.has_lexical(generation.collection)


def configured_generation(
    generations: list[Generation],
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    model_id: str,
    store: QdrantStore,
) -> Generation | None:
    """The kept generation the configured pipeline is (see `serves_as_is`), or None: the
    next sync registers one. The live generation first: a previous one of the same key
    stays previous (rolling back is `generations rollback`)."""
    identity = pipeline_identity(spec, embedder_spec, model_id)
    key = pipeline_key(identity)
    kept = sorted(
        (g for g in generations if g.state in KEPT_STATES), key=lambda g: g.state != "live"
    )
    for generation in kept:
        if generation.pipeline_key == key or serves_as_is(generation, identity, store):
            return generation
    return None


def physical_names(spec: SourceSpec, number: int, store: QdrantStore) -> tuple[str, str, str]:
    """(ledger key, schema.table, collection) of generation `number` of a new source."""
    schema, table = spec.pg_table
    name = generation_name(table, number)
    if len(name) > POSTGRES_NAME_LIMIT:
        raise GenerationError(
            f"source {spec.name!r}: the table of generation {number}, {name!r}, is longer than "
            f"Postgres' {POSTGRES_NAME_LIMIT} characters; set a shorter `pgvector: {{table: "
            "...}}`"
        )
    target = spec.target if number == 1 else f"{schema}.{name}"
    collection = spec.qdrant_collection
    if number > 1 or store.supports_aliases:
        # A server reads the stable name through an alias, so no generation may own it.
        collection = generation_name(collection, number)
    return target, f"{schema}.{name}", collection


def ensure_generation(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    model_id: str,
    engine: sa.Engine,
    store: QdrantStore,
) -> list[Generation]:
    """The source's generations, after registering one for the configured pipeline if none
    (live, building or previous) has it. A building generation of another pipeline (the
    configuration changed again mid-build) is dropped: only the newest is built."""
    registry = Generations(engine, spec.name)
    key = config_key(spec, embedder_spec, model_id)
    generations = registry.all()
    if any(g.pipeline_key == key and g.state in KEPT_STATES for g in generations):
        return generations
    with engine.begin() as conn:
        lock_registry(conn)
        generations = registry.all(conn, lock=True)
        record = pipeline_record(spec, embedder_spec, model_id)
        found = configured_generation(generations, spec, embedder_spec, model_id, store)
        if found is not None:
            if found.pipeline_key != key:
                registry.set_pipeline(conn, found.number, key, record)
                return registry.all(conn)
            return generations
        if not generations:
            _adopt_or_create_first(conn, registry, spec, record, key, model_id, store)
        else:
            for stale in (g for g in generations if g.state == "building"):
                drop_generation_state(conn, registry, stale)
            number = max(g.number for g in generations) + 1
            live = any(g.state == "live" for g in generations)
            registry.insert(conn, new_generation(spec, number, key, record, model_id, store, live))
    return registry.all()


def new_generation(
    spec: SourceSpec,
    number: int,
    key: str,
    record: dict,
    model_id: str,
    store: QdrantStore,
    live_exists: bool,
) -> Generation:
    """Generation `number` of the configured pipeline, before it is inserted."""
    target, table, collection = physical_names(spec, number, store)
    return Generation(
        source=spec.name,
        number=number,
        target=target,
        pg_table=table,
        collection=collection,
        pipeline_key=key,
        pipeline=record,
        model=model_id,
        state="building" if live_exists else "live",
        promote=spec.generations.promote,
        created_at=None,  # type: ignore[arg-type]  # set by the database
        promoted_at=None,
        retired_at=None,
        dropped_at=None,
        blocked_reason=None,
        blocked_at=None,
    )


def _adopt_or_create_first(
    conn: sa.Connection,
    registry: Generations,
    spec: SourceSpec,
    record: dict,
    key: str,
    model_id: str,
    store: QdrantStore,
) -> None:
    first = new_generation(spec, 1, key, record, model_id, store, False)
    target, table, collection = first.target, first.pg_table, first.collection
    recorded = Ledger(conn.engine, spec.target, spec.name, "").record(conn)
    if recorded is not None and recorded.model != model_id:
        raise GenerationError(
            f"pgvector table {spec.target} holds vectors of {recorded.model}, made before "
            f"generations existed, but source {spec.name!r} now uses {model_id}. Set the "
            f"embedder back to {recorded.model} for one sync (the table becomes generation "
            "1), then change the model: it is built as generation 2 beside it."
        )
    schema, name = spec.pg_table
    if relation_kind(conn, schema, name) in ("r", "p"):
        adopt_table(conn, spec.pg_table, (schema, table.split(".", 1)[1]))
    if recorded is not None and collection != spec.qdrant_collection:
        # A server's points go to the generation's own collection (readers keep the old
        # one until the copy is complete and the alias replaces it): resent from pgvector.
        conn.execute(
            sa.text(
                f"""UPDATE {STATE_SCHEMA}.row_state SET qdrant_hash = NULL,
                    qdrant_chunk_count = 0 WHERE target = :t"""
            ),
            {"t": target},
        )
        conn.execute(
            sa.text(f"DELETE FROM {STATE_SCHEMA}.row_state WHERE target = :t AND deleted"),
            {"t": target},
        )
    conn.execute(
        sa.text(f"UPDATE {STATE_SCHEMA}.targets SET qdrant_collection = :c WHERE target = :t"),
        {"c": collection, "t": target},
    )
    registry.insert(conn, first)


def drop_generation_state(
    conn: sa.Connection, registry: Generations, generation: Generation
) -> None:
    """Drop a generation's table and state rows, in the caller's transaction; its Qdrant
    collection is removed by `promotion.sweep_dropped` (an embedded store may be busy)."""
    conn.execute(sa.text(f"DROP TABLE IF EXISTS {quote_table(generation.schema_table)}"))
    forget_target(conn, generation.target)
    registry.set_state(conn, generation.number, "dropped")


def generation_spec(spec: SourceSpec, generation: Generation) -> SourceSpec:
    """The configured source as generation `generation` syncs it: its table, collection,
    template, chunking and lexical language (where its Qdrant collection has terms in one);
    everything else (metadata, filters, limits) as configured."""
    pipeline = generation.pipeline
    language = pipeline.get(QDRANT_LEXICAL, spec.hybrid.language)
    return spec.model_copy(
        update={
            "text": pipeline["text"],
            "chunking": ChunkingSpec(**pipeline["chunking"]),
            "pgvector": spec.pgvector.model_copy(update={"table": generation.pg_table}),
            "qdrant": spec.qdrant.model_copy(update={"collection": generation.collection}),
            "hybrid": spec.hybrid.model_copy(update={"language": language}),
        }
    )


def generation_embedder(generation: Generation, key: str, configured: Embedder) -> Embedder:
    """The configured embedder for the configured pipeline's generation; the one a
    generation was built with, from its stored spec, for any other."""
    if generation.pipeline_key == key:
        return configured
    raw = json.dumps(generation.pipeline["embedder"], sort_keys=True)
    return make_embedder(_stored_embedder_spec(raw))


@functools.cache
def _stored_embedder_spec(raw: str) -> EmbedderSpec:
    # Cached by its JSON: one spec object, so one embedder (and loaded model) per process.
    return _EMBEDDER_SPEC.validate_json(raw)


def pick(generations: list[Generation], which: int | str | None) -> Generation:
    """`which`: a number, "live", "building", or None (the building one, else live)."""
    kept = [g for g in generations if g.state != "dropped"]
    if isinstance(which, int):
        found = [g for g in generations if g.number == which]
        if not found:
            raise GenerationError(f"no generation {which}; kept: {[g.number for g in kept]}")
        return found[0]
    wanted = ("building", "live") if which is None else (which,)
    for state in wanted:
        for generation in kept:
            if generation.state == state:
                return generation
    raise GenerationError(f"no {which or 'live or building'} generation")


def generation_runtime(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    configured: Embedder,
    database_url: str,
    store: QdrantStore,
    which: int | str | None = None,
    register: bool = True,
) -> SourceRuntime:
    """The runtime of one generation of a configured source (see `pick`); without
    `register` (read-only callers) an edited pipeline is not registered."""
    engine = engine_for(database_url)
    if register:
        generations = ensure_generation(spec, embedder_spec, configured.model_id, engine, store)
    else:
        generations = Generations(engine, spec.name).all()
    return runtime_of_generation(
        spec, embedder_spec, configured, database_url, store, generations, pick(generations, which)
    )


def runtime_of_generation(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    configured: Embedder,
    database_url: str,
    store: QdrantStore,
    generations: list[Generation],
    generation: Generation,
) -> SourceRuntime:
    key = config_key(spec, embedder_spec, configured.model_id)
    kept = [g for g in generations if g.state in KEPT_STATES]
    watched: list[str] = []
    for other in kept:
        watched.extend(template_fields(other.pipeline["text"]))
    same_model = tuple(
        other.schema_table
        for other in kept
        if other.number != generation.number and other.model == generation.model
    )
    if generation.pipeline_key == key:
        name, budget = spec.embedder, embedder_spec.max_tokens_per_day
    else:
        stored = generation.pipeline["embedder"]
        name, budget = generation.pipeline["embedder_name"], stored.get("max_tokens_per_day")
    return source_runtime(
        generation_spec(spec, generation),
        database_url,
        generation_embedder(generation, key, configured),
        store,
        embedder_name=name,
        tokens_per_day=budget,
        generation=generation,
        stable=(spec.pg_table, spec.qdrant_collection),
        watched_extra=tuple(sorted(set(watched))),
        same_model_tables=same_model,
    )


def sibling_runtime(runtime: SourceRuntime, state: str) -> SourceRuntime | None:
    """The runtime of the source's generation in `state` beside `runtime`'s (the live one
    beside a build), with that generation's own embedder; None if there is none."""
    generations = Generations(runtime.engine, runtime.spec.name).all()
    other = next((g for g in generations if g.state == state), None)
    if other is None or runtime.generation is None:
        return None
    if other.number == runtime.generation.number:
        return runtime
    return source_runtime(
        generation_spec(runtime.spec, other),
        runtime.engine.url.render_as_string(hide_password=False),
        generation_embedder(other, runtime.generation.pipeline_key, runtime.embedder),
        runtime.qdrant.store,
        generation=other,
        stable=(runtime.stable_table, runtime.stable_collection),
    )


def all_runtimes(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    configured: Embedder,
    database_url: str,
    store: QdrantStore,
    states: tuple[str, ...] = ("live", "building"),
    register: bool = True,
) -> list[SourceRuntime]:
    """Runtimes of the source's generations in `states`, live first; without `register`
    (read-only callers) the configured pipeline is not registered if it is new."""
    engine = engine_for(database_url)
    if register:
        generations = ensure_generation(spec, embedder_spec, configured.model_id, engine, store)
    else:
        generations = Generations(engine, spec.name).all()
    chosen = sorted((g for g in generations if g.state in states), key=lambda g: g.state != "live")
    return [
        runtime_of_generation(spec, embedder_spec, configured, database_url, store, generations, g)
        for g in chosen
    ]


def describe_pipeline(pipeline: dict[str, Any]) -> str:
    chunking = pipeline["chunking"]
    return (
        f"{pipeline['model']}, text {pipeline['text']!r}, chunks of {chunking['max_tokens']} "
        f"tokens overlapping {chunking['overlap']}"
    )


def runtime_for(
    settings: Settings,
    source: str,
    database_url: str,
    generation: int | str | None = None,
    register: bool = True,
) -> SourceRuntime:
    """A source's runtime outside Dagster (CLI, tests, benchmarks): of `generation` (a
    number, or "live"), by default the one being built, else the live one."""
    from embedding_assets.sync.generations import generation_runtime

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    return generation_runtime(
        spec,
        embedder_spec,
        make_embedder(embedder_spec),
        database_url,
        qdrant_store_from_env(),
        generation,
        register,
    )
