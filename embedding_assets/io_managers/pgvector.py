import time

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import EmbeddedRows
from embedding_assets.core.sharding import shard_index
from embedding_assets.resources.database import DatabaseResource
from embedding_assets.runtime import spec_and_store


class PgVectorIOManager(dg.ConfigurableIOManager):
    """Stores a shard's embeddings in the source's pgvector table: one transaction replaces
    the chunks of every processed row and removes deleted rows. Loading returns the shard's
    stored chunks with their vectors."""

    database: DatabaseResource
    sources_file: str

    def _store(self, context: dg.OutputContext | dg.InputContext):
        return spec_and_store(self.sources_file, context.asset_key.path[0], self.database.url)[1]

    def handle_output(self, context: dg.OutputContext, obj: EmbeddedRows) -> None:
        store = self._store(context)
        started = time.perf_counter()
        stats = store.write(obj)
        seconds = time.perf_counter() - started
        context.add_output_metadata(
            {
                "pgvector_table": store.target,
                "rows_written": stats.rows_written,
                "chunks_written": stats.chunks_written,
                "rows_deleted": stats.rows_deleted,
                "rows_skipped_newer_write": stats.rows_skipped_stale,
                "seconds_writing": round(seconds, 3),
            }
        )

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        store = self._store(context)
        return store.stored_chunks(shard_index(context.partition_key))
