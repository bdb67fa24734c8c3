"""The IO managers of a source's stored assets: `embeddings` into the destinations written in
the ledger's transaction, `vector_index` into Qdrant; the intermediate stages in Postgres."""

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import EmbeddedRows, IndexUpdate
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.metadata import dagster_metadata
from embedding_assets.defs.resources import DatabaseResource, RuntimeResource
from embedding_assets.state.staging import StagedOutputs
from embedding_assets.sync.shard_steps import apply_index, store


class PgVectorIOManager(dg.ConfigurableIOManager):
    """Stores a shard's embeddings in every destination written in the ledger's transaction
    (the pgvector chunk table, the write-back column): one transaction replaces the chunks of
    every processed row, removes deleted rows, records them in the ledger and acknowledges the
    change-feed entries consumed. Loading returns the shard's stored chunks with their
    vectors."""

    runtime: RuntimeResource

    def handle_output(self, context: dg.OutputContext, obj: EmbeddedRows) -> None:
        runtime = self.runtime.source(context.asset_key.path[0], generation=obj.pending.generation)
        context.add_output_metadata(dagster_metadata(store(runtime, obj, context.log)))

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        runtime = self.runtime.source(context.asset_key.path[0])
        return runtime.pgvector.stored_chunks(shard_index(context.partition_key))


class QdrantIOManager(dg.ConfigurableIOManager):
    """Applies a shard's index update to the source's Qdrant collection (upserts, deletes)
    and records in the ledger what Qdrant now holds."""

    runtime: RuntimeResource

    def handle_output(self, context: dg.OutputContext, obj: IndexUpdate) -> None:
        runtime = self.runtime.source(context.asset_key.path[0], generation=obj.generation)
        figures = apply_index(runtime, obj, context.log, server=bool(self.runtime.qdrant.url))
        context.add_output_metadata(dagster_metadata(figures))

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
        size = StagedOutputs(self.database.engine()).put(
            context.asset_key.to_user_string(), context.partition_key, obj, context.run_id
        )
        context.add_output_metadata({"staged_bytes": size})

    def load_input(self, context: dg.InputContext):
        return StagedOutputs(self.database.engine()).get(
            context.asset_key.to_user_string(), context.partition_key
        )
