"""The IO managers of a source's stored assets: `embeddings` into the destinations written in
the ledger's transaction, `vector_index` into Qdrant; the intermediate stages in Postgres."""

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import EmbeddedRows, IndexUpdate
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.metadata import dagster_metadata
from embedding_assets.defs.resources import DatabaseResource, RuntimeResource
from embedding_assets.defs.shard_ranges import LazyShards, ShardStream
from embedding_assets.state.staging import StagedOutputs
from embedding_assets.sync.shard_steps import apply_index, store


class PgVectorIOManager(dg.ConfigurableIOManager):
    """Stores a shard's embeddings in every destination written in the ledger's transaction
    (the pgvector chunk table, the write-back column): one transaction replaces the chunks of
    every processed row, removes deleted rows, records them in the ledger and acknowledges the
    change-feed entries consumed. Loading returns the shard's stored chunks with their
    vectors."""

    runtime: RuntimeResource

    def handle_output(self, context: dg.OutputContext, obj: EmbeddedRows | ShardStream) -> None:
        source = context.asset_key.path[0]

        def write(embedded: EmbeddedRows) -> dict:
            runtime = self.runtime.source(source, generation=embedded.pending.generation)
            return store(runtime, embedded, context.log)

        if isinstance(obj, ShardStream):
            context.add_output_metadata(obj.store_each(lambda _key, embedded: write(embedded)))
        else:
            context.add_output_metadata(dagster_metadata(write(obj)))

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        runtime = self.runtime.source(context.asset_key.path[0])
        return runtime.pgvector.stored_chunks(shard_index(context.partition_key))


class QdrantIOManager(dg.ConfigurableIOManager):
    """Applies a shard's index update to the source's Qdrant collection (upserts, deletes)
    and records in the ledger what Qdrant now holds."""

    runtime: RuntimeResource

    def handle_output(self, context: dg.OutputContext, obj: IndexUpdate | ShardStream) -> None:
        source, server = context.asset_key.path[0], bool(self.runtime.qdrant.url)

        def write(update: IndexUpdate) -> dict:
            runtime = self.runtime.source(source, generation=update.generation)
            return apply_index(runtime, update, context.log, server=server)

        if isinstance(obj, ShardStream):
            context.add_output_metadata(obj.store_each(lambda _key, update: write(update)))
        else:
            context.add_output_metadata(dagster_metadata(write(obj)))

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        """The shard's points as (id, row_id, chunk_index, text) rows."""
        runtime = self.runtime.source(context.asset_key.path[0])
        ids = runtime.pgvector.stored_chunks(shard_index(context.partition_key))["point_id"]
        hits = runtime.qdrant.retrieve(ids.tolist())
        return pd.DataFrame(
            [
                {
                    "point_id": h.id,
                    "row_id": h.payload.get("row_id"),
                    "chunk_index": h.payload.get("chunk_index"),
                    "text": h.payload.get("text"),
                }
                for h in hits
            ]
        )


class StagingIOManager(dg.ConfigurableIOManager):
    """Keeps a shard's intermediate outputs (pending rows, chunks) in Postgres."""

    database: DatabaseResource

    def handle_output(self, context: dg.OutputContext, obj) -> None:
        staged, asset = StagedOutputs(self.database.engine()), context.asset_key.to_user_string()
        if isinstance(obj, ShardStream):

            def put(key: str, value) -> dict:
                return {"staged_bytes": staged.put(asset, key, value, context.run_id)}

            context.add_output_metadata(obj.store_each(put))
            return
        size = staged.put(asset, context.partition_key, obj, context.run_id)
        context.add_output_metadata({"staged_bytes": size})

    def load_input(self, context: dg.InputContext):
        """A run of several shards gets a mapping that reads each shard when asked."""
        staged, asset = StagedOutputs(self.database.engine()), context.asset_key.to_user_string()
        keys = context.asset_partition_keys if context.has_asset_partitions else []
        if len(keys) > 1:
            return LazyShards(sorted(keys), lambda key: staged.get(asset, key))
        return staged.get(asset, context.partition_key)
