"""Intermediate stage outputs (pending rows, chunks) kept in Postgres, not on local disk,
so any stage of any shard can run on any worker and be re-run alone from the UI."""

import pickle
from typing import Any

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.migrations import migrate


class StagedOutputs:
    def __init__(self, engine: sa.Engine):
        self.engine = engine
        migrate(engine)

    def put(self, asset_key: str, partition_key: str, value: Any, run_id: str | None) -> int:
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""INSERT INTO {STATE_SCHEMA}.staged_outputs
                        (asset_key, partition_key, run_id, payload) VALUES (:a, :p, :r, :b)
                    ON CONFLICT (asset_key, partition_key) DO UPDATE SET run_id = EXCLUDED.run_id,
                        payload = EXCLUDED.payload, stored_at = now()"""
                ),
                {"a": asset_key, "p": partition_key, "r": run_id, "b": payload},
            )
        return len(payload)

    def get(self, asset_key: str, partition_key: str) -> Any:
        with self.engine.connect() as conn:
            payload = conn.scalar(
                sa.text(
                    f"SELECT payload FROM {STATE_SCHEMA}.staged_outputs "
                    "WHERE asset_key = :a AND partition_key = :p"
                ),
                {"a": asset_key, "p": partition_key},
            )
        if payload is None:
            raise LookupError(
                f"{asset_key} has no stored output for shard {partition_key}; "
                "materialize it (or the whole shard) first"
            )
        return pickle.loads(payload)
