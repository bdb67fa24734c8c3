"""The live lane's writes, reported to the Dagster instance as runless events: per shard a
materialization of each stage it ran (`pending_rows`, `chunks`, `embeddings`,
`vector_index`) with the figures a run's step reports, and its `vectors_valid` result. The
asset pages, partition status, freshness checks and `status` then show the lane's work as
they show a run's. Reported from a thread of their own, so the instance's storage never
delays the lane's next write."""

import logging
import queue
import threading

import dagster as dg

from embedding_assets.defs.checks import check_evaluation
from embedding_assets.defs.metadata import dagster_metadata
from embedding_assets.sync.live_pass import PassOutcome

log = logging.getLogger("embedding_assets.live")

WRITTEN_BY = "written_by"  # the metadata key telling a lane's materialization from a run's
LIVE_LANE = "live lane"


def lane_events(source: str, outcome: PassOutcome) -> list[dg.AssetMaterialization]:
    """The pass's events, shard after shard, in the order a run emits them."""
    events = []
    for report in outcome.reports:
        for stage, figures in report.stages.items():
            events.append(
                dg.AssetMaterialization(
                    asset_key=[source, stage],
                    partition=report.key,
                    metadata=dagster_metadata({**figures, WRITTEN_BY: LIVE_LANE}),
                )
            )
        for (stage, check), result in report.checks.items():
            events.append(check_evaluation(dg.AssetKey([source, stage]), check, report.key, result))
    return events


class LiveReporter:
    """Takes passes from the lane and writes their events to the instance in order."""

    def __init__(self, instance: dg.DagsterInstance) -> None:
        self.instance = instance
        self._passes: queue.Queue[tuple[str, PassOutcome] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="live-reports", daemon=True)
        self._thread.start()

    def __call__(self, source: str, outcome: PassOutcome) -> None:
        self._passes.put((source, outcome))

    def close(self) -> None:
        """Report what is queued, then stop."""
        self._passes.put(None)
        self._thread.join(timeout=60)

    def _run(self) -> None:
        while (item := self._passes.get()) is not None:
            source, outcome = item
            for event in lane_events(source, outcome):
                try:
                    self.instance.report_runless_asset_event(event)
                except Exception:  # the sinks hold the write; only its record is lost
                    log.warning("live lane: could not report %s to Dagster", event, exc_info=True)
