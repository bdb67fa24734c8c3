import time

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import IndexUpdate
from embedding_assets.core.sharding import shard_index
from embedding_assets.promotion import after_index_write
from embedding_assets.resources.runtime import RuntimeResource


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
