"""How far a source's shards are behind, in the terms the UI shows: rows waiting, rows
Qdrant lacks, how long the oldest change has waited, and whether that is within the
source's `freshness_seconds`. Read from the change feed and the ledger, never the source
table (trigger and watermark capture; diff capture compares the whole source)."""

from dataclasses import dataclass

from embedding_assets.sync.runtime import SourceRuntime


@dataclass(frozen=True)
class ShardLag:
    shard: int
    pending_rows: int
    qdrant_lag_rows: int
    failed_rows: int
    # How long the oldest waiting change has waited: its queue entry's age, else how long
    # the lag sensor has seen the shard behind; None when unknown or nothing waits.
    oldest_pending_seconds: float | None
    freshness_seconds: int

    @property
    def behind(self) -> bool:
        return bool(self.pending_rows or self.qdrant_lag_rows)

    @property
    def late(self) -> bool:
        """Rows have waited longer than the source's freshness budget."""
        age = self.oldest_pending_seconds
        return self.behind and age is not None and age > self.freshness_seconds

    def metadata(self) -> dict[str, int | float]:
        found: dict[str, int | float] = {
            "pending_rows": self.pending_rows,
            "qdrant_lag_rows": self.qdrant_lag_rows,
            "failed_rows": self.failed_rows,
            "freshness_seconds": self.freshness_seconds,
        }
        if self.oldest_pending_seconds is not None:
            found["oldest_pending_seconds"] = round(self.oldest_pending_seconds, 1)
        return found


def shard_lags(
    runtime: SourceRuntime, behind_since: dict[int, float] | None = None, now: float = 0.0
) -> list[ShardLag]:
    """Per shard. `behind_since` (epoch seconds, by shard) dates a wait the queue cannot:
    diff capture, rows only Qdrant lacks."""
    work = runtime.work()
    errors = runtime.errors.counts_by_shard()
    ages = runtime.feed.queue.oldest_by_shard() if runtime.feed.mode != "diff" else {}
    lags = []
    for shard in range(runtime.spec.shards):
        pending, lagging = work[shard].pending_rows, work[shard].qdrant_lag_rows
        # Figures of one moment: a queue age only beside queued rows (the two are separate
        # reads), and how long the shard has been behind only while it still is.
        age = ages.get(shard) if pending else None
        if age is None and (pending or lagging) and behind_since and shard in behind_since:
            age = max(0.0, now - behind_since[shard])
        lags.append(
            ShardLag(
                shard=shard,
                pending_rows=pending,
                qdrant_lag_rows=lagging,
                failed_rows=sum(errors.get(shard, (0, 0))),
                oldest_pending_seconds=age,
                freshness_seconds=runtime.spec.freshness_seconds,
            )
        )
    return lags
