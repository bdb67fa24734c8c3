"""Per-shard lag figures that describe one moment: no wait beside nothing waiting."""

from types import SimpleNamespace

from embedding_assets.state.diff import ShardWork
from embedding_assets.sync.lag import shard_lags


def runtime(work: dict[int, ShardWork], ages: dict[int, float]) -> SimpleNamespace:
    queue = SimpleNamespace(oldest_by_shard=lambda: ages)
    return SimpleNamespace(
        spec=SimpleNamespace(shards=len(work), freshness_seconds=60),
        work=lambda: work,
        errors=SimpleNamespace(counts_by_shard=lambda: {}),
        feed=SimpleNamespace(mode="trigger", queue=queue),
    )


def test_a_shard_no_longer_behind_reports_no_wait():
    """The demo drained: shard 0 was behind since 69.6 s ago (the lag sensor's cursor),
    and now nothing waits: its wait is gone with its rows."""
    work = {0: ShardWork(0, 0, 0, None), 1: ShardWork(1, 3, 0, "f")}
    (drained, busy) = shard_lags(runtime(work, {1: 12.0}), {0: 930.4, 1: 990.0}, 1000.0)
    assert drained.oldest_pending_seconds is None and not drained.late
    assert busy.oldest_pending_seconds == 12.0  # the queue dates its own rows


def test_a_queue_age_read_after_its_rows_were_taken_is_not_reported():
    work = {0: ShardWork(0, 0, 0, None)}  # the rows were consumed between the two reads
    (lag,) = shard_lags(runtime(work, {0: 69.6}), None, 1000.0)
    assert lag.oldest_pending_seconds is None


def test_rows_only_qdrant_lacks_are_dated_by_how_long_the_shard_is_behind():
    work = {0: ShardWork(0, 0, 7, "f")}
    (lag,) = shard_lags(runtime(work, {}), {0: 900.0}, 1000.0)
    assert lag.oldest_pending_seconds == 100.0 and lag.late
