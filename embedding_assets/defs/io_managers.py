"""The IO managers of a source's stored assets: `embeddings` into the destinations written in
the ledger's transaction, `vector_index` into Qdrant; the intermediate stages in Postgres."""

import time

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import EmbeddedRows, IndexUpdate
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.resources import DatabaseResource, RuntimeResource
from embedding_assets.state.staging import StagedOutputs
from embedding_assets.sync.promotion import after_index_write
from embedding_assets.sync.store import store_embeddings

# What the `embeddings` asset reports of the chunk table when the source has none
# (`pgvector: false`); the chunk table's own figures replace these.
WITHOUT_CHUNK_TABLE = {
    "pgvector_table": "off",
    "vector_index_dropped_for_rewrite": False,
    "vector_index_built": False,
    "index_build_duration_seconds": 0.0,
}


class PgVectorIOManager(dg.ConfigurableIOManager):
    """Stores a shard's embeddings in every destination written in the ledger's transaction
    (the pgvector chunk table, the write-back column): one transaction replaces the chunks of
    every processed row, removes deleted rows, records them in the ledger and acknowledges the
    change-feed entries consumed. Loading returns the shard's stored chunks with their
    vectors."""

    runtime: RuntimeResource

    def handle_output(self, context: dg.OutputContext, obj: EmbeddedRows) -> None:
        runtime = self.runtime.source(context.asset_key.path[0], generation=obj.pending.generation)
        started = time.perf_counter()
        stats = store_embeddings(runtime, obj)
        seconds = time.perf_counter() - started
        waiting, dead = runtime.errors.counts_by_shard().get(obj.pending.shard, (0, 0))
        _, chunks, _ = runtime.ledger.holdings_by_shard().get(obj.pending.shard, (0, 0, 0))
        context.add_output_metadata(
            {
                "dagster/row_count": chunks,  # the shard's chunks in the table now
                "rows_waiting_for_retry": waiting,
                "dead_rows": dead,
                **WITHOUT_CHUNK_TABLE,
                **stats.metadata,  # each destination's figures
                "rows_written": stats.rows_written,
                "chunks_written": stats.chunks_written,
                "rows_deleted": stats.rows_deleted,
                "rows_skipped_newer_write": stats.rows_skipped_stale,
                "rows_refused_by_destinations": stats.rows_refused,
                "write_duration_seconds": round(seconds, 3),
            }
        )
        if not runtime.following:
            # No step follows (no Qdrant): promotion and the readers' switch happen here.
            context.add_output_metadata(after_index_write(runtime, context.log))

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        runtime = self.runtime.source(context.asset_key.path[0])
        return runtime.pgvector.stored_chunks(shard_index(context.partition_key))


class QdrantIOManager(dg.ConfigurableIOManager):
    """Applies a shard's index update to the source's Qdrant collection (upserts, deletes)
    and records in the ledger what Qdrant now holds."""

    runtime: RuntimeResource

    def handle_output(self, context: dg.OutputContext, obj: IndexUpdate) -> None:
        runtime = self.runtime.source(context.asset_key.path[0], generation=obj.generation)
        started = time.perf_counter()
        runtime.qdrant.apply(obj)
        seconds = time.perf_counter() - started
        # This step holds the embedded store's pool: the moment to count its points for a
        # promotion and to remove what dropped generations left.
        outcome = after_index_write(runtime, context.log)
        _, _, points = runtime.ledger.holdings_by_shard().get(obj.shard, (0, 0, 0))
        context.add_output_metadata(
            {
                "dagster/row_count": points,  # the shard's points in the collection now
                "qdrant_collection": runtime.qdrant.collection,
                "qdrant": "server" if self.runtime.qdrant.url else "embedded",
                "points_upserted": len(obj.upserts),
                "points_deleted": len(obj.deletes),
                "rows_synced": len(obj.synced),
                **outcome,
                "write_duration_seconds": round(seconds, 3),
            }
        )

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
