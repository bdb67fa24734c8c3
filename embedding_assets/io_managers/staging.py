import dagster as dg

from embedding_assets.resources.database import DatabaseResource
from embedding_assets.state.staging import StagedOutputs


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
