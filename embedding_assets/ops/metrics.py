"""Prometheus metrics (`/metrics` of `embedding-assets serve`, `dev`'s worker, and `embedding-assets
live --metrics-port`).

Two kinds:

- The store's figures, read from our state tables at scrape time (`StoreCollector`), so any
  process that serves /metrics reports every writer's work, runs and the live lane alike, and
  a restart loses nothing. Per source and generation:

  embedding_assets_pending_rows                 rows queued by the capture triggers
  embedding_assets_oldest_pending_seconds       how long the oldest of them has waited
  embedding_assets_qdrant_lag_rows              rows whose points Qdrant does not hold yet
  embedding_assets_pgvector_qdrant_parity_delta chunks in pgvector minus points in Qdrant,
                                                as the ledger records them (0 when in step)
  embedding_assets_failed_rows / _dead_rows     rows in the error table, retrying / given up
  embedding_assets_rows_{embedded,deleted,failed,dead}_total   what the store step did
  embedding_assets_last_write_timestamp_seconds the last successful write

- Embedder calls, in the process that makes them (`embedders.telemetry`, OpenTelemetry
  GenAI names): gen_ai_client_operation_duration_seconds and gen_ai_client_token_usage.
  Runs are short-lived processes: with PROMETHEUS_MULTIPROC_DIR set (`dev` does), each
  writes its figures there and /metrics serves the sum over every process.

No Dagster here.
"""

import functools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import REGISTRY, Collector

from embedding_assets.state.db import engine_for
from embedding_assets.state.ddl import STATE_SCHEMA

log = logging.getLogger(__name__)

KEPT_STATES = ("live", "building", "previous")
LABELS = ["source", "generation", "state"]


class StoreCollector(Collector):
    """The store's figures per source and generation, read when scraped (a handful of
    grouped queries over the state tables; the ledger only where Qdrant lags)."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self) -> Iterator:
        up = GaugeMetricFamily(
            "embedding_assets_store_up",
            "1 if the store's figures could be read from Postgres at this scrape, else 0.",
        )
        try:
            with engine_for(self.database_url).connect() as conn:
                figures = _read(conn)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            log.warning("metrics: the store's figures could not be read: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        families = {
            "pending_rows": GaugeMetricFamily(
                "embedding_assets_pending_rows",
                "Rows queued by the capture triggers, not written yet.",
                labels=LABELS,
            ),
            "oldest_pending_seconds": GaugeMetricFamily(
                "embedding_assets_oldest_pending_seconds",
                "Seconds the oldest queued change has waited (0 when none waits).",
                labels=LABELS,
            ),
            "qdrant_lag_rows": GaugeMetricFamily(
                "embedding_assets_qdrant_lag_rows",
                "Rows whose Qdrant points are behind pgvector.",
                labels=LABELS,
            ),
            "parity_delta": GaugeMetricFamily(
                "embedding_assets_pgvector_qdrant_parity_delta",
                "Chunks in pgvector minus points in Qdrant, as the ledger records them.",
                labels=LABELS,
            ),
            "failed_rows": GaugeMetricFamily(
                "embedding_assets_failed_rows",
                "Rows that failed to embed and wait for their next retry.",
                labels=LABELS,
            ),
            "dead_rows": GaugeMetricFamily(
                "embedding_assets_dead_rows",
                "Rows given up on after their last retry (`embedding-assets errors`).",
                labels=LABELS,
            ),
            "last_write": GaugeMetricFamily(
                "embedding_assets_last_write_timestamp_seconds",
                "Unix time of the last successful write (absent before the first).",
                labels=LABELS,
            ),
        }
        counters = {
            name: CounterMetricFamily(f"embedding_assets_rows_{name}", help_, labels=LABELS)
            for name, help_ in (
                ("embedded", "Rows stored with their vectors (new or reused)."),
                ("deleted", "Rows deleted from the sinks."),
                ("failed", "Failed attempts to embed or store a row."),
                ("dead", "Rows that turned dead."),
            )
        }
        for labels, values in figures:
            for key, family in families.items():
                if values.get(key) is not None:
                    family.add_metric(labels, values[key])
            for name, family in counters.items():
                family.add_metric(labels, values[f"rows_{name}"])
        yield from families.values()
        yield from counters.values()


def _by_target(conn: sa.Connection, sql: str) -> dict:
    return {row.target: row for row in conn.execute(sa.text(sql))}


def _read(conn: sa.Connection) -> list[tuple[list[str], dict]]:
    """([source, generation, state], {figure: value}) per kept generation."""
    generations = conn.execute(
        sa.text(
            f"""SELECT source, number, state, target FROM {STATE_SCHEMA}.generations
            WHERE state = ANY(:kept) ORDER BY source, number"""
        ),
        {"kept": list(KEPT_STATES)},
    ).fetchall()
    queue = _by_target(
        conn,
        f"""SELECT target, count(DISTINCT row_id) AS rows,
            extract(epoch FROM now() - min(queued_at)) AS age
        FROM {STATE_SCHEMA}.change_queue GROUP BY target""",
    )
    errors = _by_target(
        conn,
        f"""SELECT target, count(*) FILTER (WHERE state = 'retrying') AS failed,
            count(*) FILTER (WHERE state = 'dead') AS dead
        FROM {STATE_SCHEMA}.row_errors GROUP BY target""",
    )
    # Rows in step count 0 to the delta: only the lagging ones are read (a partial index).
    lag = _by_target(
        conn,
        f"""SELECT target, count(*) AS rows,
            sum(CASE WHEN deleted THEN 0 ELSE chunk_count END - qdrant_chunk_count) AS delta
        FROM {STATE_SCHEMA}.row_state
        WHERE qdrant_hash IS DISTINCT FROM content_hash OR qdrant_chunk_count <> chunk_count
        GROUP BY target""",
    )
    writes = _by_target(
        conn,
        f"""SELECT target, sum(rows_embedded) AS embedded, sum(rows_deleted) AS deleted,
            sum(rows_failed) AS failed, sum(rows_dead) AS dead,
            extract(epoch FROM max(last_write_at)) AS last_write
        FROM {STATE_SCHEMA}.write_counts GROUP BY target""",
    )
    found = []
    for g in generations:
        queued, failed, lagging, written = (
            table.get(g.target) for table in (queue, errors, lag, writes)
        )
        found.append(
            (
                [g.source, str(g.number), g.state],
                {
                    "pending_rows": queued.rows if queued else 0,
                    "oldest_pending_seconds": float(queued.age) if queued else 0.0,
                    "qdrant_lag_rows": lagging.rows if lagging else 0,
                    "parity_delta": int(lagging.delta or 0) if lagging else 0,
                    "failed_rows": failed.failed if failed else 0,
                    "dead_rows": failed.dead if failed else 0,
                    "last_write": float(written.last_write)
                    if written and written.last_write
                    else None,
                    **{
                        f"rows_{name}": int(getattr(written, name) or 0) if written else 0
                        for name in ("embedded", "deleted", "failed", "dead")
                    },
                },
            )
        )
    return found


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@functools.cache
def exposed_registry() -> CollectorRegistry:
    """What this process's /metrics serves: its own metrics (the default registry), or with
    PROMETHEUS_MULTIPROC_DIR set (`dev` sets it for everything it starts), every process's
    that wrote there: the runs' embedder calls too, after the run has ended."""
    if not os.environ.get(MULTIPROC_ENV):
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry


def serve_store_metrics(database_url: str) -> None:
    """Add the store's figures to what /metrics serves, once."""
    registry = exposed_registry()
    if not any(isinstance(c, StoreCollector) for c in list(registry._collector_to_names)):
        registry.register(StoreCollector(database_url))


def fresh_multiprocess_dir(folder: Path) -> dict[str, str]:
    """An emptied `folder` for PROMETHEUS_MULTIPROC_DIR (files of earlier processes would
    be counted again), as the environment to give the processes that share it."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {MULTIPROC_ENV: str(folder)}
