"""Daily token budgets of embedders (`max_tokens_per_day`): what was sent to an embedder
today (UTC), recorded after each embedding call, so runs stop taking new rows once it is
spent. Rows then wait, pending, until the next day; nothing fails."""

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.migrations import migrate

TODAY = "CAST(now() AT TIME ZONE 'UTC' AS date)"


class TokenBudget:
    def __init__(self, engine: sa.Engine, embedder: str, per_day: int | None):
        self.engine = engine
        self.embedder = embedder
        self.per_day = per_day
        migrate(engine)

    def used_today(self) -> int:
        with self.engine.connect() as conn:
            used = conn.scalar(
                sa.text(
                    f"SELECT tokens FROM {STATE_SCHEMA}.token_usage "
                    f"WHERE embedder = :e AND day = {TODAY}"
                ),
                {"e": self.embedder},
            )
        return int(used or 0)

    def left(self) -> int | None:
        """Tokens still to spend today; None without a budget."""
        if self.per_day is None:
            return None
        return max(0, self.per_day - self.used_today())

    def spend(self, tokens: int) -> None:
        """Record tokens sent (committed at once: the provider has counted them)."""
        if tokens <= 0:
            return
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""INSERT INTO {STATE_SCHEMA}.token_usage (embedder, day, tokens)
                    VALUES (:e, {TODAY}, :n) ON CONFLICT (embedder, day)
                    DO UPDATE SET tokens = token_usage.tokens + EXCLUDED.tokens"""
                ),
                {"e": self.embedder, "n": int(tokens)},
            )

    def describe(self) -> dict:
        used = self.used_today()
        return {
            "embedder": self.embedder,
            "max_tokens_per_day": self.per_day,
            "tokens_used_today": used,
            "spent": self.per_day is not None and used >= self.per_day,
        }
