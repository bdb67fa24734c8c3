"""The four assets of a source, one builder each: pending rows, chunks, embeddings (written to
pgvector and the write-back column by their IO manager), vector index (Qdrant)."""

import time
from dataclasses import replace

import dagster as dg

from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import ChunkedRows, EmbeddedRows, IndexUpdate, PendingRows
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.metadata import (
    common_attributes,
    embedder_kind,
    source_key,
    staging_tags,
)
from embedding_assets.defs.resources import runtime_of
from embedding_assets.ops.pools import EMBEDDED_QDRANT_POOL, embedder_pool
from embedding_assets.sync.chunk import chunk_rows, effective_max_tokens
from embedding_assets.sync.config_edits import apply_config
from embedding_assets.sync.embed import embed_chunks, fit_token_budget, reusable_vectors


def source_resources(spec: SourceSpec) -> set[str]:
    """The resources every step of the source uses: runtimes, and its embedder."""
    return {"runtime", embedder_resource_key(spec.embedder)}


def build_pending_rows(spec: SourceSpec, shards: dg.PartitionsDefinition) -> dg.AssetsDefinition:
    name = spec.name

    @dg.asset(
        key=[name, "pending_rows"],
        group_name=name,
        kinds={"postgres", "pandas"},
        partitions_def=shards,
        io_manager_key="staging_io_manager",
        required_resource_keys=source_resources(spec),
        deps=[source_key(spec)],
        owners=spec.owners,
        tags=staging_tags(spec),
    )
    def pending_rows(context: dg.AssetExecutionContext) -> PendingRows:
        """Rows of this shard that need work now: new or changed rows (their text, metadata
        or the model differs from what is stored) and rows to remove (deleted, or no longer
        matching `where`). At most `max_rows_per_run`; the sensor asks again for the rest."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec)
        runtime.require_privileges()  # a missing grant stops the run before any embedding
        edit = apply_config(runtime)  # an edit of sources.yaml, whoever runs first
        if edit.changed:
            context.log.info(f"{spec.name}: {edit.describe()}")
        shard = shard_index(context.partition_key)
        runtime.claim_shard(
            shard,
            on_wait=lambda: context.log.info(
                f"shard {context.partition_key} is being synced by another run; waiting for "
                "its write, so no row is embedded twice"
            ),
        )
        pending = replace(
            runtime.feed.pending(shard, spec.max_rows_per_run), generation=runtime.number
        )
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "rows": len(pending.rows),
                "rows_to_delete": len(pending.deleted),
                "empty_text_rows": pending.empty_rows,
                "backlog": pending.backlog,
                "change_capture": runtime.feed.mode,
                **generation_metadata(runtime),
                "feed_entries": len(pending.consumed),
                "duration_seconds": round(seconds, 3),
            }
        )
        return pending

    return pending_rows


def build_chunks(
    spec: SourceSpec, embedder_spec: EmbedderSpec, shards: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    name = spec.name

    @dg.asset(
        key=[name, "chunks"],
        group_name=name,
        kinds={"python", embedder_kind(embedder_spec)},
        partitions_def=shards,
        io_manager_key="staging_io_manager",
        required_resource_keys=source_resources(spec),
        owners=spec.owners,
        tags=staging_tags(spec),
    )
    def chunks(context: dg.AssetExecutionContext, pending_rows: PendingRows) -> ChunkedRows:
        """Each pending row's text split into chunks of at most `max_tokens` tokens of the
        embedder's own tokenizer, overlapping by `overlap` tokens, with a content hash per
        chunk. Rows with NULL or blank text get no chunk."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec, pending_rows.generation)
        embedder = runtime.embedder
        chunked = chunk_rows(pending_rows, runtime.spec, embedder)
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "rows": len(pending_rows.rows),
                "chunks": len(chunked.chunks),
                "tokens": chunked.tokens,
                "max_tokens": effective_max_tokens(runtime.spec, embedder),
                "empty_text_rows": pending_rows.empty_rows,
                "duration_seconds": round(seconds, 3),
                "rows_per_second": _per_second(len(pending_rows.rows), seconds),
            }
        )
        return chunked

    return chunks


def build_embeddings(
    spec: SourceSpec,
    embedder_spec: EmbedderSpec,
    shards: dg.PartitionsDefinition,
    metadata: dict,
) -> dg.AssetsDefinition:
    name = spec.name

    @dg.asset(
        key=[name, "embeddings"],
        group_name=name,
        kinds={"pgvector", embedder_kind(embedder_spec)},
        partitions_def=shards,
        io_manager_key="pgvector_io_manager",
        required_resource_keys=source_resources(spec),
        pool=embedder_pool(spec.embedder),
        metadata=metadata,
        **common_attributes(spec),
    )
    def embeddings(context: dg.AssetExecutionContext, chunks: ChunkedRows) -> EmbeddedRows:
        """One vector per chunk, stored in the source's pgvector table. A chunk whose text
        already has a vector for this model is copied, not re-embedded: only changed
        chunks cost compute."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec, chunks.pending.generation)
        embedder = runtime.embedder
        reusable = reusable_vectors(runtime, chunks)
        calls_before = embedder_stats(embedder)
        tokens_left = runtime.budget.left()
        deferred: list[str] = []
        if tokens_left is not None:
            chunks, deferred = fit_token_budget(chunks, reusable, embedder.dimension, tokens_left)
            if deferred:
                context.log.warning(
                    f"{len(deferred)} rows wait for tomorrow's token budget of embedder "
                    f"{runtime.budget.embedder!r} ({runtime.budget.per_day:,} tokens per UTC "
                    f"day, {tokens_left:,} left): they stay pending, nothing fails"
                )

        def keep_progress(hashes: list[str], vectors, done: int, total: int) -> None:
            # Committed at once: a run interrupted after this keeps these vectors.
            runtime.vector_cache.save(hashes, vectors)
            context.log.info(f"embedded {done:,} of {total:,} new chunks (progress kept)")

        embedded = embed_chunks(chunks, embedder, reusable, keep_progress)
        runtime.budget.spend(embedded.embedded_tokens)
        seconds = time.perf_counter() - started
        rows = len(chunks.pending.rows)
        reasons = {
            row: f"{failure.kind}: {failure.message}" for row, failure in embedded.failures.items()
        }
        if reasons:
            context.log.warning(
                f"{len(reasons)} rows failed and are recorded in the error table (retried "
                f"later; `embedding-assets errors --source {name}` lists them): "
                + "; ".join(f"{row}: {why}" for row, why in list(reasons.items())[:5])
            )
        context.add_output_metadata(
            {
                **stats_delta(calls_before, embedder_stats(embedder)),
                "failed_rows": len(embedded.failures),
                "failed_row_reasons": dg.MetadataValue.json(dict(list(reasons.items())[:50])),
                **generation_metadata(runtime),
                "rows": rows,
                "chunks": len(chunks.chunks),
                "tokens": chunks.tokens,
                "embedded_chunks": embedded.embedded_chunks,
                "embedded_tokens": embedded.embedded_tokens,
                "reused_chunks": embedded.reused_chunks,
                "rows_waiting_for_token_budget": len(deferred),
                "duration_seconds": round(seconds, 3),
                "rows_per_second": _per_second(rows, seconds),
            }
        )
        return embedded

    return embeddings


def build_vector_index(
    spec: SourceSpec,
    shards: dg.PartitionsDefinition,
    embeddings: dg.AssetsDefinition,
    metadata: dict,
    qdrant_url: str | None,
) -> dg.AssetsDefinition:
    name = spec.name

    @dg.asset(
        key=[name, "vector_index"],
        group_name=name,
        kinds={"qdrant"},
        partitions_def=shards,
        io_manager_key="qdrant_io_manager",
        required_resource_keys=source_resources(spec),
        deps=[embeddings],
        pool=None if qdrant_url else EMBEDDED_QDRANT_POOL,
        metadata=metadata,
        **common_attributes(spec),
    )
    def vector_index(context: dg.AssetExecutionContext) -> IndexUpdate:
        """The shard's chunks as points in the source's Qdrant collection (payload: row id,
        chunk index, text, metadata columns). Planned from what pgvector and the ledger
        hold, not from this run's output, so a crash between the two writes converges."""
        started = time.perf_counter()
        runtime = runtime_of(context, spec)
        update, stats = runtime.qdrant.plan(
            shard_index(context.partition_key),
            runtime.embedder.dimension,
            spec.max_rows_per_run,
            runtime.model_id,
        )
        update.generation = runtime.number
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "rows": stats.lag_rows,
                "reconciled_shard": stats.reconciled,
                "created_collection": stats.created_collection,
                "backlog": update.backlog,
                **generation_metadata(runtime),
                "planning_duration_seconds": round(seconds, 3),
            }
        )
        return update

    return vector_index


def embedder_stats(embedder) -> dict[str, float]:
    """Cumulative request counters of a remote embedder ({} for a local model)."""
    stats = getattr(embedder, "stats", None)
    return dict(stats()) if stats else {}


def stats_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This run's share: requests, retries, throttled seconds, tokens, provider usage."""
    delta = {k: v - before.get(k, 0) for k, v in after.items()}
    # Counters stay integers (the UI plots 3.0 requests otherwise); waits keep decimals.
    return {
        f"embedder_{k}": int(v) if float(v).is_integer() else round(v, 3) for k, v in delta.items()
    }


def generation_metadata(runtime) -> dict[str, object]:
    """Which generation a step worked on: the UI shows a build's progress by it."""
    generation = runtime.generation
    if generation is None:
        return {}
    # Text, not numbers: a constant is not a series to plot.
    return {
        "generation": dg.MetadataValue.text(str(generation.number)),
        "generation_state": generation.state,
    }


def _per_second(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0
