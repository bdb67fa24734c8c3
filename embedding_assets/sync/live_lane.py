"""The live lane: a long-lived loop that waits on Postgres `LISTEN` for the capture triggers'
notifications, gathers them for a few milliseconds, and syncs the notified sources' live
generation at once (`live_pass`), so a committed change is searchable in about a second
instead of after a sensor tick and a Dagster run.

- Idle, it waits in `LISTEN` (no query, no poll); a heartbeat thread keeps its row in
  `live_lanes` fresh, which is how the sensor knows to leave fresh changes to it, and how
  `status` and the source asset show it.
- At start (and after its listening connection was lost) it makes one pass over every source
  it serves: what was committed while nobody listened is queued, and is taken then.
- Shards a run holds, and Qdrant points it could not write (a run holds the embedded store),
  are tried again every `RETRY_SECONDS` until done; nothing else is polled.
- It never holds more than a pass: killed, what it had read stays queued (acknowledged only
  with the ledger write), and the sensor's runs take it once its heartbeat is stale.
"""

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from embedding_assets.state.generations import GenerationError
from embedding_assets.state.lanes import HEARTBEAT_SECONDS, LaneRegistry
from embedding_assets.state.triggers import LIVE_CHANNEL
from embedding_assets.sync.live_pass import PassOutcome, live_pass
from embedding_assets.sync.runtime import SourceRuntime

log = logging.getLogger("embedding_assets.live")

GATHER_SECONDS = 0.01  # after a notification, wait this long for the rest of a burst
RETRY_SECONDS = 0.25  # busy or lagging shards are tried again this soon
IDLE_SECONDS = 1.0  # idle, wake this often to see a stop asked (no query: only a select)
ERROR_PAUSE_SECONDS = 2.0  # after a pass failed as a whole (database gone): pause, go on


@dataclass(frozen=True)
class LaneSource:
    name: str
    runtime: Callable[[], SourceRuntime]  # the live generation's, resolved for each pass


class Listener:
    """A connection that LISTENs on the capture triggers' channel."""

    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)
        self.conn.execute(f"LISTEN {LIVE_CHANNEL}")

    def wait(self, timeout: float) -> set[str]:
        """Source names notified within `timeout` s, with the rest of their burst."""
        names = {n.payload for n in self.conn.notifies(timeout=timeout, stop_after=1)}
        if names:
            names |= {n.payload for n in self.conn.notifies(timeout=GATHER_SECONDS)}
        return names

    def close(self) -> None:
        self.conn.close()


class LiveLane:
    def __init__(
        self,
        sources: list[LaneSource],
        conninfo: str,
        registry: LaneRegistry,
        report: Callable[[str, PassOutcome], None],
        server: bool = False,
    ) -> None:
        self.sources = {s.name: s for s in sources}
        self.conninfo = conninfo
        self.registry = registry
        self.report = report
        self.server = server
        self.stop = threading.Event()
        self.holding = 0  # queued changes of the pass in progress (the heartbeat's backlog)
        self._again: dict[str, set[int]] = {name: set() for name in self.sources}
        self._retry: set[str] = set()  # sources whose last pass failed as a whole

    def run(self) -> None:
        self.registry.register()
        beat = threading.Thread(target=self._beat, name="live-heartbeat", daemon=True)
        beat.start()
        listener: Listener | None = None
        try:
            while not self.stop.is_set():
                if listener is None:  # LISTEN first: nothing committed after it is missed
                    listener = Listener(self.conninfo)
                    due = set(self.sources)  # what came while nobody listened
                    log.info("live lane listening on %s for %s", LIVE_CHANNEL, sorted(due))
                for name in sorted(due):
                    self._serve(name)
                waiting = any(self._again.values()) or bool(self._retry)
                try:
                    notified = listener.wait(RETRY_SECONDS if waiting else IDLE_SECONDS)
                except psycopg.OperationalError as lost:
                    log.warning("live lane lost its listening connection (%s); reconnecting", lost)
                    listener = None
                    self.stop.wait(ERROR_PAUSE_SECONDS)
                    continue
                again = {n for n, shards in self._again.items() if shards}
                due = (notified & set(self.sources)) | again | self._retry
        finally:
            self.stop.set()
            if listener is not None:
                listener.close()
            beat.join(timeout=5)
            self.registry.leave()

    def _serve(self, name: str) -> None:
        source = self.sources[name]
        try:
            runtime = source.runtime()
            # One opening of an embedded Qdrant collection per pass, not per shard; let go
            # when the pass ends, so runs and `search` get it between passes.
            with runtime.qdrant.store.keep_open():
                outcome = live_pass(
                    runtime, log, self._again[name], self.server, on_queued=self._hold
                )
        except GenerationError:  # not synced yet: its first sync's triggers will wake us
            log.debug("live lane: %s has no live generation yet", name)
            return
        except Exception as error:  # the database or the embedder is gone: the sensor's turn
            cause = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            log.warning("live lane: %s: %s", name, cause)
            self._write_down(0, cause)
            self._retry.add(name)  # its changes stay queued: tried again after a pause
            self.stop.wait(ERROR_PAUSE_SECONDS)
            return
        finally:
            self.holding = 0
        self._retry.discard(name)
        self._again[name] = outcome.again
        if outcome.reports:
            self.report(name, outcome)
        failed = "; ".join(f"{k}: {v}" for k, v in sorted(outcome.failed.items())) or None
        if outcome.reports or failed:
            self._write_down(outcome.rows_written, failed)
        if failed:  # the embedder is down, or a row is bad: not retried in a tight loop
            self.stop.wait(ERROR_PAUSE_SECONDS)

    def _hold(self, entries: int) -> None:
        self.holding = entries

    def _write_down(self, rows: int, error: str | None) -> None:
        try:
            self.registry.wrote(rows, error)
        except Exception:  # the heartbeat says it next; never lose the loop over a figure
            log.debug("live lane: could not record its write", exc_info=True)

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SECONDS):
            try:
                self.registry.beat(self.holding)
            except Exception:
                log.debug("live lane heartbeat failed", exc_info=True)
