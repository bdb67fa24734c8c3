"""Live lanes' heartbeats (`embedding_assets.live_lanes`): each running lane keeps its row
fresh; the changes sensor leaves a source's fresh changes to a lane whose heartbeat is
recent, and `status` and the source asset show the lane's health. Ages are read on the
database's clock, so a lane and a sensor on different machines agree."""

import socket
from dataclasses import asdict, dataclass

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.migrations import migrate

HEARTBEAT_SECONDS = 0.5
# A lane whose heartbeat is older is down (its beats come from their own thread, so a long
# embedding call does not make a live lane look dead).
STALE_SECONDS = 2.0
# A lane's row left behind by a killed lane is removed by the next lane after this long.
FORGET_SECONDS = 86_400


def lane_id(pid: int) -> str:
    return f"{socket.gethostname()}:{pid}"


@dataclass(frozen=True)
class LaneHealth:
    """One moment of the lane that serves a source (the freshest heartbeat naming it)."""

    # up, down (heartbeat stale: killed or stopped), none (never started), off (no lane may
    # serve the source: live: false, or no capture triggers to wake one)
    state: str
    lane: str | None = None
    heartbeat_age_seconds: float | None = None
    last_write_age_seconds: float | None = None
    rows_written: int = 0
    backlog: int = 0
    last_error: str | None = None

    @property
    def up(self) -> bool:
        return self.state == "up"

    def figures(self) -> dict:
        """For the source asset's metadata (`live_lane_*` keys)."""
        if self.state == "off":
            return {"live_lane_state": "off"}
        return {f"live_lane_{k}": v for k, v in asdict(self).items() if v is not None}


class LaneRegistry:
    """This lane's row: registered at start, beaten, counted on each write, left at exit."""

    def __init__(self, engine: sa.Engine, lane: str, sources: list[str]) -> None:
        self.engine = engine
        self.lane = lane
        self.sources = sources

    def register(self) -> None:
        migrate(self.engine)
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"DELETE FROM {STATE_SCHEMA}.live_lanes WHERE lane = :l "
                    "OR heartbeat_at < now() - make_interval(secs => :forget)"
                ),
                {"l": self.lane, "forget": FORGET_SECONDS},
            )
            conn.execute(
                sa.text(f"INSERT INTO {STATE_SCHEMA}.live_lanes (lane, sources) VALUES (:l, :s)"),
                {"l": self.lane, "s": self.sources},
            )

    def beat(self, backlog: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"UPDATE {STATE_SCHEMA}.live_lanes SET heartbeat_at = now(), backlog = :b "
                    "WHERE lane = :l"
                ),
                {"l": self.lane, "b": backlog},
            )

    def wrote(self, rows: int, error: str | None = None) -> None:
        """After a pass: rows written (0 for none), and the pass's error, if any."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"""UPDATE {STATE_SCHEMA}.live_lanes SET heartbeat_at = now(),
                    rows_written = rows_written + :n, last_error = :e,
                    last_write_at = CASE WHEN :n > 0 THEN now() ELSE last_write_at END
                    WHERE lane = :l"""
                ),
                {"l": self.lane, "n": rows, "e": error},
            )

    def leave(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.text(f"DELETE FROM {STATE_SCHEMA}.live_lanes WHERE lane = :l"),
                {"l": self.lane},
            )


def lane_health(engine: sa.Engine, source: str) -> LaneHealth:
    """The freshest lane serving `source`; `none` if no lane ever registered it."""
    migrate(engine)
    with engine.connect() as conn:
        row = conn.execute(
            sa.text(
                f"""SELECT lane, rows_written, backlog, last_error,
                    extract(epoch FROM now() - heartbeat_at) AS beat_age,
                    extract(epoch FROM now() - last_write_at) AS write_age
                FROM {STATE_SCHEMA}.live_lanes WHERE :s = ANY(sources)
                ORDER BY heartbeat_at DESC LIMIT 1"""
            ),
            {"s": source},
        ).one_or_none()
    if row is None:
        return LaneHealth("none")
    beat_age = float(row.beat_age)
    return LaneHealth(
        state="up" if beat_age <= STALE_SECONDS else "down",
        lane=row.lane,
        heartbeat_age_seconds=round(beat_age, 1),
        last_write_age_seconds=None if row.write_age is None else round(float(row.write_age), 1),
        rows_written=int(row.rows_written),
        # What a dead lane held is the sensor's now: not shown as the lane's backlog.
        backlog=int(row.backlog) if beat_age <= STALE_SECONDS else 0,
        last_error=row.last_error,
    )
