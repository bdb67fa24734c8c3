"""The configuration each generation's store was last brought in line with: the values of the
source's `eligibility` and `in_place` keys (`config.effects`), per ledger key. Whoever runs
next (a sync, a sensor tick, a run) compares it with sources.yaml; `status` reports the
difference as a pending edit instead of calling the store converged."""

import json
from typing import Any

import sqlalchemy as sa

from embedding_assets.config.effects import RECORDED, fingerprint
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.migrations import migrate


class AppliedConfig:
    def __init__(self, engine: sa.Engine, target: str):
        self.engine = engine
        self.target = target
        migrate(engine)

    def read(self, conn: sa.Connection | None = None) -> dict[str, Any] | None:
        """What was last applied; None when nothing was recorded (a new target, or a store
        from before the record existed)."""
        query = sa.text(f"SELECT config FROM {STATE_SCHEMA}.applied_config WHERE target = :t")
        if conn is None:
            with self.engine.connect() as own:
                return own.scalar(query, {"t": self.target})
        return conn.scalar(query, {"t": self.target})

    def record(self, conn: sa.Connection, config: dict[str, Any]) -> None:
        prints = {effect.value: fingerprint(config, effect) for effect in RECORDED}
        conn.execute(
            sa.text(
                f"""INSERT INTO {STATE_SCHEMA}.applied_config (target, config, fingerprints)
                VALUES (:t, CAST(:c AS jsonb), CAST(:f AS jsonb))
                ON CONFLICT (target) DO UPDATE SET config = EXCLUDED.config,
                    fingerprints = EXCLUDED.fingerprints, applied_at = now()"""
            ),
            {"t": self.target, "c": json.dumps(config), "f": json.dumps(prints)},
        )

    def lock(self, conn: sa.Connection) -> None:
        """One process brings a target in line at a time, until the transaction ends."""
        conn.execute(
            sa.text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"{self.target}#config"}
        )
