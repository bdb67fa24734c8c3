"""Back as soon as the embedder is: while work waits out its retry backoff after failed runs
(60 s, 120 s, 240 s ...), the changes sensor probes the embedder with one small request at
most every PROBE_EVERY_SECONDS. When a probe that failed is followed by one that answers,
work that failed before that moment goes again at once instead of at the end of its
backoff. Work that fails for its own reasons (the embedder answered the probes all along)
keeps its backoff, and so does work that failed after the embedder came back.

Plain: the sensor keeps the state in its cursor (`to_cursor` / `from_cursor`).
"""

from collections.abc import Callable
from dataclasses import dataclass

PROBE_EVERY_SECONDS = 5.0


@dataclass
class EmbedderHealth:
    down_since: float | None = None  # a probe failed, and none answered since
    up_since: float | None = None  # when a probe answered after one had failed
    probed_at: float = 0.0

    @classmethod
    def from_cursor(cls, state: dict) -> "EmbedderHealth":
        return cls(state.get("down_since"), state.get("up_since"), state.get("probed_at", 0.0))

    def to_cursor(self) -> dict:
        return {
            "down_since": self.down_since,
            "up_since": self.up_since,
            "probed_at": self.probed_at,
        }

    def probe(self, now: float, answers: Callable[[], bool]) -> None:
        """Ask the embedder, unless it was asked less than PROBE_EVERY_SECONDS ago."""
        if now - self.probed_at < PROBE_EVERY_SECONDS:
            return
        self.probed_at = now
        if answers():
            if self.down_since is not None:
                self.down_since, self.up_since = None, now
        else:
            self.down_since = self.down_since if self.down_since is not None else now
            self.up_since = None

    def retry_now(self, last_failure: float) -> bool:
        """Whether work whose last run failed at `last_failure` may go before its backoff
        ends: the embedder was seen down and has answered since that failure's time."""
        return self.up_since is not None and last_failure < self.up_since
