import time

import dagster as dg
import pandas as pd

from embedding_assets.core.delta import EmbeddedRows
from embedding_assets.core.sharding import shard_index
from embedding_assets.pipeline import store_embeddings
from embedding_assets.promotion import after_index_write
from embedding_assets.resources.runtime import RuntimeResource


class PgVectorIOManager(dg.ConfigurableIOManager):
    """Stores a shard's embeddings in the source's pgvector table: one transaction replaces
    the chunks of every processed row, removes deleted rows, records them in the ledger and
    acknowledges the change-feed entries consumed. Loading returns the shard's stored chunks
    with their vectors."""

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
                "pgvector_table": runtime.pgvector.table
                if runtime.spec.pgvector.enabled
                else "off",
                "rows_written": stats.rows_written,
                "chunks_written": stats.chunks_written,
                "rows_deleted": stats.rows_deleted,
                "rows_skipped_newer_write": stats.rows_skipped_stale,
                "vector_index_dropped_for_rewrite": stats.index_dropped,
                "vector_index_built": stats.index_built,
                "index_build_duration_seconds": stats.index_seconds,
                "write_duration_seconds": round(seconds, 3),
            }
        )
        if not runtime.spec.qdrant.enabled:
            # No Qdrant step follows: promotion and the readers' switch happen here.
            context.add_output_metadata(after_index_write(runtime, context.log))
        if runtime.column is not None:
            context.add_output_metadata(
                {
                    "write_back_table": runtime.column.relation,
                    "write_back_rows_written": stats.column_rows_written,
                    "write_back_rows_changed_since_read": stats.column_rows_changed_since_read,
                    "write_back_index_built": stats.column_index_built,
                }
            )

    def load_input(self, context: dg.InputContext) -> pd.DataFrame:
        runtime = self.runtime.source(context.asset_key.path[0])
        return runtime.pgvector.stored_chunks(shard_index(context.partition_key))
