"""One pass of the live lane over a source: each shard of the live generation with queued
changes (or points Qdrant still lacks from an earlier pass), synced by the plain steps a run
uses (claim, read, chunk, embed, store, check, index), so the ledger, the claims, the
generation rules and the error table are a run's, and so are the figures each shard reports.

A shard a run holds is skipped, not waited for (the run takes the changes queued before it
read; what came after stays queued and the next pass takes it). The lane reads a shard's
newest changes, `LIVE_ROWS_PER_SHARD` at most: a larger backlog is bulk work, left to runs.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from embedding_assets.state.lanes import LaneHealth, lane_health
from embedding_assets.sync import shard_checks, shard_steps
from embedding_assets.sync.runtime import SourceRuntime
from embedding_assets.sync.shard_checks import CheckOutcome

LIVE_ROWS_PER_SHARD = 512
# While a lane is up, the sensor leaves it a shard's queued changes this long; older ones (a
# lane that is up but cannot write them) are the sensor's runs' again.
LANE_GRACE_SECONDS = 10.0


@dataclass
class ShardReport:
    """What the lane did to one shard: each stage's figures, as a run's events carry them."""

    key: str
    stages: dict[str, dict] = field(default_factory=dict)  # stage -> figures
    checks: dict[tuple[str, str], CheckOutcome] = field(default_factory=dict)  # (stage, check)
    rows_written: int = 0


@dataclass
class PassOutcome:
    reports: list[ShardReport] = field(default_factory=list)
    busy: list[int] = field(default_factory=list)  # shards a run held: try again soon
    lagging: list[int] = field(default_factory=list)  # Qdrant not written: try again soon
    failed: dict[str, str] = field(default_factory=dict)  # shard key -> cause
    failed_shards: list[int] = field(default_factory=list)  # tried again after a pause
    seconds: float = 0.0

    @property
    def rows_written(self) -> int:
        return sum(r.rows_written for r in self.reports)

    @property
    def again(self) -> set[int]:
        return {*self.busy, *self.lagging, *self.failed_shards}


def source_lane(runtime: SourceRuntime) -> LaneHealth:
    """The lane serving the source, one moment of it; `off` where none may (live: false,
    or a capture without triggers to notify one)."""
    if runtime.spec.live is False or runtime.feed.mode != "trigger":
        return LaneHealth("off")
    return lane_health(runtime.engine, runtime.spec.name)


def shards_left_to_lane(runtime: SourceRuntime) -> set[int]:
    """The shards whose queued changes the sensor leaves to a live lane that is up: of the
    live generation of a source the lane may serve, with few queued changes, all fresh (a
    backlog, e.g. a first sync's or a reconcile's, is the runs' bulk work)."""
    generation = runtime.generation
    if generation is not None and generation.state != "live":
        return set()
    if not source_lane(runtime).up:
        return set()
    return runtime.feed.queue.fresh_shards(LIVE_ROWS_PER_SHARD, LANE_GRACE_SECONDS)


def live_pass(
    runtime: SourceRuntime,
    log: shard_steps.Log,
    also: set[int] = frozenset(),
    server: bool = False,
    on_queued: Callable[[int], None] | None = None,
) -> PassOutcome:
    """Sync every shard with queued changes, and the shards in `also` (an earlier pass's
    busy or lagging ones); `on_queued` hears how many queue entries the pass found."""
    started = time.perf_counter()
    outcome = PassOutcome()
    queued = runtime.feed.queue.summary_by_shard()
    if on_queued is not None:
        on_queued(sum(q.entries for q in queued.values()))
    shards = set(queued) | set(also)
    keys = runtime.spec.shard_keys
    for shard in sorted(shards):
        if not runtime.try_claim_shard(shard):
            outcome.busy.append(shard)
            continue
        try:
            report = sync_shard(runtime, shard, keys[shard], log, server)
            if report is not None:
                outcome.reports.append(report)
                if "qdrant_deferred" in report.stages.get("vector_index", {}):
                    outcome.lagging.append(shard)
        except Exception as error:  # the other shards go on; the sensor retries this one
            cause = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            log.warning(f"live lane: shard {keys[shard]} of {runtime.spec.name} failed: {cause}")
            outcome.failed[keys[shard]] = cause
            outcome.failed_shards.append(shard)
        finally:
            runtime.release_shard(shard)
    outcome.seconds = time.perf_counter() - started
    return outcome


def sync_shard(
    runtime: SourceRuntime, shard: int, key: str, log: shard_steps.Log, server: bool
) -> ShardReport | None:
    """The shard's steps, under the claim the caller holds; None if nothing was to do."""
    report = ShardReport(key)
    pending, figures = shard_steps.read_pending(
        runtime, shard, log, key, check_config=False, live_rows=LIVE_ROWS_PER_SHARD
    )
    if len(pending.rows) or len(pending.deleted) or pending.consumed:
        report.stages["pending_rows"] = figures
        chunked, report.stages["chunks"] = shard_steps.chunk_pending(runtime, pending)
        embedded, figures = shard_steps.embed_pending(runtime, chunked, log)
        figures.update(shard_steps.store(runtime, embedded, log))
        report.stages["embeddings"] = figures
        report.rows_written = figures["rows_written"] + figures["rows_deleted"]
        written = embedded.pending.rows["row_id"].tolist()
        valid = shard_checks.vectors_valid(runtime, shard, written)
        report.checks[("embeddings", "vectors_valid")] = valid
        if not valid.passed:  # the blocking check: as in a run, Qdrant is not written
            raise RuntimeError(f"shard {key}: vectors_valid failed; Qdrant is not written")
    if runtime.spec.qdrant.enabled:
        update, figures = shard_steps.plan_index(runtime, shard)
        if update.upserts or update.deletes or update.synced or update.reset_shard:
            figures.update(_apply_index(runtime, update, log, server))
            report.stages["vector_index"] = figures
    return report if report.stages else None


def _apply_index(runtime: SourceRuntime, update, log: shard_steps.Log, server: bool) -> dict:
    """Qdrant's write; with the embedded engine held by a run past the store's lock wait,
    the points stay lagging in the ledger and the next pass writes them."""
    try:
        return shard_steps.apply_index(runtime, update, log, server)
    except TimeoutError as waited:
        log.warning(f"live lane: {waited}; Qdrant gets shard {update.shard} on the next pass")
        return {"qdrant_deferred": str(waited)}
