"""The four assets of a source, one builder each: pending rows, chunks, embeddings (written to
pgvector and the write-back column by their IO manager), vector index (Qdrant)."""

import dagster as dg

from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import ChunkedRows, EmbeddedRows, PendingRows
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.metadata import (
    common_attributes,
    dagster_metadata,
    embedder_kind,
    source_key,
    staging_tags,
)
from embedding_assets.defs.resources import runtime_of
from embedding_assets.defs.shard_ranges import ShardStream, range_keys
from embedding_assets.ops.pools import EMBEDDED_QDRANT_POOL, embedder_pool
from embedding_assets.sync.shard_steps import (
    chunk_pending,
    embed_pending,
    plan_index,
    read_pending,
)

# A backfill of many shards is one run: each step goes shard after shard (defs/shard_ranges).
ONE_RUN = dg.BackfillPolicy.single_run()


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
        backfill_policy=ONE_RUN,
        io_manager_key="staging_io_manager",
        required_resource_keys=source_resources(spec),
        deps=[source_key(spec)],
        owners=spec.owners,
        tags=staging_tags(spec),
    )
    def pending_rows(context: dg.AssetExecutionContext):
        """Rows of this shard that need work now: new or changed rows (their text, metadata
        or the model differs from what is stored) and rows to remove (deleted, or no longer
        matching `where`). At most `max_rows_per_run`; the sensor asks again for the rest."""
        runtime = runtime_of(context, spec)

        def read(key: str) -> tuple[PendingRows, dict]:
            return read_pending(runtime, shard_index(key), context.log, key)

        keys = range_keys(context)
        if keys:
            return ShardStream(keys, read)
        pending, figures = read(context.partition_key)
        context.add_output_metadata(dagster_metadata(figures))
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
        backfill_policy=ONE_RUN,
        io_manager_key="staging_io_manager",
        required_resource_keys=source_resources(spec),
        owners=spec.owners,
        tags=staging_tags(spec),
    )
    def chunks(context: dg.AssetExecutionContext, pending_rows):
        """Each pending row's text split into chunks of at most `max_tokens` tokens of the
        embedder's own tokenizer, overlapping by `overlap` tokens, with a content hash per
        chunk. Rows with NULL or blank text get no chunk."""
        keys = range_keys(context)
        if keys:  # a mapping of shard key to PendingRows, read when chunked

            def chunk(key: str) -> tuple[ChunkedRows, dict]:
                pending = pending_rows[key]
                return chunk_pending(runtime_of(context, spec, pending.generation), pending)

            return ShardStream(keys, chunk)
        runtime = runtime_of(context, spec, pending_rows.generation)
        chunked, figures = chunk_pending(runtime, pending_rows)
        context.add_output_metadata(dagster_metadata(figures))
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
        backfill_policy=ONE_RUN,
        io_manager_key="pgvector_io_manager",
        required_resource_keys=source_resources(spec),
        pool=embedder_pool(spec.embedder),
        metadata=metadata,
        **common_attributes(spec),
    )
    def embeddings(context: dg.AssetExecutionContext, chunks):
        """One vector per chunk, stored in the source's pgvector table. A chunk whose text
        already has a vector for this model is copied, not re-embedded: only changed
        chunks cost compute."""
        keys = range_keys(context)
        if keys:  # a mapping of shard key to ChunkedRows; stored shard after shard

            def embed(key: str) -> tuple[EmbeddedRows, dict]:
                chunked = chunks[key]
                runtime = runtime_of(context, spec, chunked.pending.generation)
                return embed_pending(runtime, chunked, context.log)

            return ShardStream(keys, embed)
        runtime = runtime_of(context, spec, chunks.pending.generation)
        embedded, figures = embed_pending(runtime, chunks, context.log)
        context.add_output_metadata(dagster_metadata(figures))
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
        backfill_policy=ONE_RUN,
        io_manager_key="qdrant_io_manager",
        required_resource_keys=source_resources(spec),
        deps=[embeddings],
        pool=None if qdrant_url else EMBEDDED_QDRANT_POOL,
        metadata=metadata,
        **common_attributes(spec),
    )
    def vector_index(context: dg.AssetExecutionContext):
        """The shard's chunks as points in the source's Qdrant collection (payload: row id,
        chunk index, text, metadata columns). Planned from what pgvector and the ledger
        hold, not from this run's output, so a crash between the two writes converges."""
        runtime = runtime_of(context, spec)
        keys = range_keys(context)
        if keys:
            return ShardStream(keys, lambda key: plan_index(runtime, shard_index(key)))
        update, figures = plan_index(runtime, shard_index(context.partition_key))
        context.add_output_metadata(dagster_metadata(figures))
        return update

    return vector_index
