import time

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import IndexUpdate
from embedding_assets.core.sharding import shard_index
from embedding_assets.pipeline import apply_index_update
from embedding_assets.resources.database import DatabaseResource
from embedding_assets.resources.qdrant import QdrantResource
from embedding_assets.runtime import spec_and_store


class QdrantIOManager(dg.ConfigurableIOManager):
    """Applies a shard's index update to the source's Qdrant collection (upserts, deletes)
    and records in Postgres what Qdrant now holds."""

    database: DatabaseResource
    qdrant: QdrantResource
    sources_file: str

    def handle_output(self, context: dg.OutputContext, obj: IndexUpdate) -> None:
        spec, store = spec_and_store(
            self.sources_file, context.asset_key.path[0], self.database.url
        )
        started = time.perf_counter()
        apply_index_update(spec, store, self.qdrant.store(), obj)
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "qdrant_collection": spec.qdrant_collection,
                "qdrant": "server" if self.qdrant.url else "embedded",
                "points_upserted": len(obj.upserts),
                "points_deleted": len(obj.deletes),
                "rows_synced": len(obj.synced),
                "seconds_writing": round(seconds, 3),
            }
        )

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        """The shard's points as (id, row_id, chunk_index, text) rows."""
        spec, store = spec_and_store(
            self.sources_file, context.asset_key.path[0], self.database.url
        )
        ids = store.stored_chunks(shard_index(context.partition_key))["point_id"].tolist()
        hits = self.qdrant.store().retrieve(spec.qdrant_collection, ids)
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
