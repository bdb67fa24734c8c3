"""The live lane against the real parts: the embedded Postgres (LISTEN/NOTIFY from the capture
triggers), the embedded Qdrant engine, and an OpenAI-compatible embedder on 127.0.0.1.

In-process lanes run on a thread of the test; where a run and the lane must be two
processes (claims, kill -9), the lane is the real `embedding-assets live` command."""

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.cli.live import live_sources
from embedding_assets.cli.status import status_report
from embedding_assets.config.settings import load_settings
from embedding_assets.ops.live_reports import LIVE_LANE, WRITTEN_BY, LiveReporter
from embedding_assets.state.db import engine_for
from embedding_assets.state.lanes import STALE_SECONDS, LaneRegistry, lane_health
from embedding_assets.sync.generations import runtime_for
from embedding_assets.sync.live_lane import LiveLane
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    dagster_database,
    queue_length,
    sync_shards,
    unique_name,
)
from embedding_assets_tests.integration.sync.test_crash_every_stage import qdrant_flock

pytestmark = pytest.mark.integration

WAIT_SECONDS = 60
ROWS = [{"id": i, "title": f"Doc {i}", "body": f"body of document {i}"} for i in range(1, 13)]


def two_sources(tmp_path: Path, url: str, names: list[str], **source: str) -> Path:
    """sources.yaml with one source per table in `names`, the same settings each."""
    lines = "".join(f"    {k}: {v}\n" for k, v in {"shards": "2", **source}.items())
    path = tmp_path / "sources.yaml"
    path.write_text(
        "embedders:\n  fake:\n    provider: openai\n    model: fake-embedding\n"
        f'    base_urls: ["{url}"]\n    dimension: 8\n    timeout_seconds: 20\n'
        "sources:\n"
        + "".join(
            f"  - name: {n}\n    table: {n}\n"
            f'    text: "{{title}}: {{body}}"\n    metadata: [category]\n'
            f"    embedder: fake\n{lines}"
            for n in names
        )
    )
    return path


def wait_until(condition: Callable[[], bool], what: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stored(url: str, name: str) -> dict:
    """Everything a reader sees of a source: chunk rows, the ledger, the Qdrant points."""
    settings = load_settings(os.environ["EA_TEST_SOURCES"])
    runtime = runtime_for(settings, name, url, "live", register=False)
    with engine_for(url).connect() as conn:
        chunks = conn.execute(
            sa.text(
                f"SELECT row_id, chunk_index, chunk_text, category, embedding::text AS v "
                f"FROM {runtime.pgvector.table} ORDER BY row_id, chunk_index"
            )
        ).fetchall()
        ledger = conn.execute(
            sa.text(
                "SELECT row_id, content_hash, chunk_count, qdrant_hash, deleted "
                "FROM embedding_assets.row_state WHERE target = :t ORDER BY row_id"
            ),
            {"t": runtime.target},
        ).fetchall()
        point_ids = [
            str(p) for p in conn.scalars(sa.text(f"SELECT point_id FROM {runtime.pgvector.table}"))
        ]
    hits = runtime.qdrant.store.retrieve(runtime.qdrant.collection, point_ids, vectors=True)
    points = sorted(
        (
            h.payload["row_id"],
            h.payload["chunk_index"],
            h.payload["text"],
            h.vector.round(5).tolist(),
        )
        for h in hits
    )
    return {
        "chunks": [tuple(c) for c in chunks],
        "ledger": [tuple(r) for r in ledger],
        "points": points,
        "queue": queue_length(url, runtime.target),
    }


@contextmanager
def lane_thread(settings, names: list[str], url: str, report=None) -> Iterator[LiveLane]:
    """The lane on a thread of this process, stopped (and its row left) at the end."""
    served, left = live_sources(settings, names)
    assert not left, left
    registry = LaneRegistry(engine_for(url), f"test:{unique_name()}", names)
    conninfo = (
        engine_for(url).url.set(drivername="postgresql").render_as_string(hide_password=False)
    )
    lane = LiveLane(served, conninfo, registry, report or (lambda *_: None))
    thread = threading.Thread(target=lane.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: lane_health(engine_for(url), names[0]).up, "the lane's heartbeat")
        yield lane
    finally:
        lane.stop.set()
        thread.join(timeout=30)
        assert not thread.is_alive()


def change_table(url: str, table: str) -> None:
    """Inserts, an update of a watched column, a delete: in three transactions."""
    engine = engine_for(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(f"INSERT INTO {table} (id, title, body, category) VALUES (:i, :t, :b, 'new')"),
            [{"i": i, "t": f"Doc {i}", "b": f"inserted text {i}"} for i in (20, 21, 22)],
        )
    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {table} SET body = 'a changed body' WHERE id = 3"))
    with engine.begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {table} WHERE id = 5"))


@pytest.fixture
def sources(postgres, home, fake, tmp_path, monkeypatch):
    names = [unique_name("lane"), unique_name("runs")]
    for name in names:
        create_docs_table(postgres, name, ROWS)
    path = two_sources(tmp_path, fake.base_url, names)
    monkeypatch.setenv("EA_TEST_SOURCES", str(path))
    return load_settings(path), names


def test_the_lane_stores_what_a_run_stores(postgres, sources, instance) -> None:
    settings, (lane_source, run_source) = sources
    for name in (lane_source, run_source):
        sync_shards(settings, name, instance)  # the first sync: triggers in, every row stored
    with lane_thread(settings, [lane_source], postgres):
        change_table(postgres, lane_source)
        change_table(postgres, run_source)
        target = runtime_for(settings, lane_source, postgres, "live", register=False).target
        wait_until(lambda: queue_length(postgres, target) == 0, "the lane to drain its queue")
        wait_until(
            lambda: len(stored(postgres, lane_source)["points"]) == len(ROWS) - 1 + 3,
            "Qdrant to hold the lane's points",
        )
    sync_shards(settings, run_source, instance)
    by_lane, by_run = stored(postgres, lane_source), stored(postgres, run_source)
    assert by_lane == by_run
    assert ("3", 0, "Doc 3: a changed body") in [p[:3] for p in by_lane["points"]]
    assert "5" not in {c[0] for c in by_lane["chunks"]}
    assert by_lane["queue"] == 0


def test_changes_committed_before_the_lane_started_are_taken_at_its_start(
    postgres, sources, instance
) -> None:
    settings, (name, _) = sources
    sync_shards(settings, name, instance)
    change_table(postgres, name)  # nobody listens: the notifications are lost
    target = runtime_for(settings, name, postgres, "live", register=False).target
    assert queue_length(postgres, target) > 0
    with lane_thread(settings, [name], postgres):
        wait_until(lambda: queue_length(postgres, target) == 0, "the lane's first pass")
        wait_until(lambda: len(stored(postgres, name)["points"]) == len(ROWS) + 2, "Qdrant")


def test_the_lanes_writes_are_materializations_of_each_shard(postgres, sources, instance) -> None:
    settings, (name, _) = sources
    sync_shards(settings, name, instance)
    reporter = LiveReporter(instance)
    with lane_thread(settings, [name], postgres, reporter):
        change_table(postgres, name)
        target = runtime_for(settings, name, postgres, "live", register=False).target
        wait_until(lambda: queue_length(postgres, target) == 0, "the lane to drain its queue")
        wait_until(lambda: status_report(settings, name)["live_lane"]["rows_written"] == 5, "")
        lane = status_report(settings, name)["live_lane"]  # what `status --json` prints
        assert lane["state"] == "up" and lane["backlog"] == 0 and lane["last_error"] is None
        assert lane["heartbeat_age_seconds"] <= STALE_SECONDS
    reporter.close()
    assert status_report(settings, name)["live_lane"]["state"] == "none"  # it left cleanly
    spec = settings.source(name)
    for stage in ("embeddings", "vector_index"):
        records = instance.fetch_materializations(dg.AssetKey([name, stage]), limit=100).records
        by_lane = [
            r.asset_materialization
            for r in records
            if r.asset_materialization.metadata.get(WRITTEN_BY) == dg.TextMetadataValue(LIVE_LANE)
        ]
        assert by_lane, f"no {stage} materialization by the lane"
        assert {m.partition for m in by_lane} <= set(spec.shard_keys)
        assert all(r.run_id == "" for r in records if r.asset_materialization in by_lane)
    embeddings = [
        r.asset_materialization
        for r in instance.fetch_materializations(
            dg.AssetKey([name, "embeddings"]), limit=100
        ).records
        if r.asset_materialization.metadata.get(WRITTEN_BY) == dg.TextMetadataValue(LIVE_LANE)
    ]
    written = sum(
        m.metadata["rows_written"].value + m.metadata["rows_deleted"].value for m in embeddings
    )
    assert written == 5  # 3 inserted, 1 updated, 1 deleted


def test_triggers_of_the_version_before_the_lane_are_upgraded_without_a_new_diff(
    postgres, sources, instance
) -> None:
    from dataclasses import replace

    from embedding_assets.state.ddl import execute_script
    from embedding_assets.state.triggers import installed_signature

    settings, (name, _) = sources
    sync_shards(settings, name, instance)
    runtime = runtime_for(settings, name, postgres, "live", register=False)
    engine = engine_for(postgres)
    with engine.begin() as conn:
        current = runtime.feed.triggers(conn)
        execute_script(conn, replace(current, notify=False).install_sql())  # the old version
        # A row the old triggers never saw (bypassed): only a full diff would queue it.
        conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        conn.execute(sa.text(f"INSERT INTO {name} (id, title, body) VALUES (99, 'x', 'y')"))
    runtime.feed._ensured = False  # a new process after the upgrade
    runtime.feed.ensure()
    with engine.connect() as conn:
        assert installed_signature(conn, current) == current.body_signature
    assert queue_length(postgres, runtime.target) == 0  # replaced in place: no diff ran
    with lane_thread(settings, [name], postgres):
        change_table(postgres, name)  # the upgraded triggers wake the lane
        wait_until(lambda: queue_length(postgres, runtime.target) == 0, "the lane")


def start_lane(path: Path, name: str, dagster_url: str, log: Path) -> subprocess.Popen:
    """The real `embedding-assets live` command, in a session of its own (kill -9 target)."""
    return subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "--sources", str(path)]
        + ["live", "--source", name],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDDING_ASSETS_DAGSTER_PG_URL": dagster_url},
        start_new_session=True,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def row_stored(url: str, name: str, row_id: str) -> bool:
    with engine_for(url).connect() as conn:
        return bool(
            conn.scalar(
                sa.text(
                    "SELECT count(*) FROM embedding_assets.row_state WHERE target LIKE :t "
                    "AND row_id = :r AND content_hash IS NOT NULL AND NOT deleted"
                ),
                {"t": f"%{name}%", "r": row_id},
            )
        )


@pytest.mark.parametrize("stage", ["embedding", "qdrant"])
def test_a_lane_killed_mid_write_converges(
    stage, postgres, sources, instance, fake, tmp_path
) -> None:
    settings, (name, _) = sources
    sync_shards(settings, name, instance)
    lane = start_lane(
        Path(os.environ["EA_TEST_SOURCES"]), name, dagster_database(postgres), tmp_path / "l.log"
    )
    try:
        wait_until(lambda: lane_health(engine_for(postgres), name).up, "the lane to start")
        if stage == "embedding":  # the lane's embedder request hangs: kill it there
            fake.slow_text, fake.slow_seconds = "Doc 20: inserted text 20", 60
            change_table(postgres, name)
            wait_until(
                lambda: any("Doc 20: inserted text 20" in r.inputs for r in fake.requests),
                "the lane's embedder request",
            )
            os.killpg(lane.pid, signal.SIGKILL)
        else:  # pgvector written, Qdrant held by another process: kill it waiting there
            with qdrant_flock(settings.source(name).qdrant_collection):
                change_table(postgres, name)
                wait_until(lambda: row_stored(postgres, name, "20"), "the pgvector write")
                time.sleep(0.3)
                os.killpg(lane.pid, signal.SIGKILL)
        lane.wait()
    finally:
        if lane.poll() is None:
            os.killpg(lane.pid, signal.SIGKILL)
            lane.wait()
    fake.slow_text = None
    health = lane_health(engine_for(postgres), name)
    wait_until(lambda: not lane_health(engine_for(postgres), name).up, "a stale heartbeat")
    assert health.lane is not None
    sync_shards(settings, name, instance)  # the sensor's run, once the heartbeat is stale
    state = stored(postgres, name)
    ids = [c[0] for c in state["chunks"]]
    assert sorted(set(ids)) == sorted({str(r["id"]) for r in ROWS} - {"5"} | {"20", "21", "22"})
    assert len(ids) == len(set(ids)) == len(state["points"])  # no duplicate, no orphan
    assert ("3", 0, "Doc 3: a changed body") in [p[:3] for p in state["points"]]
    assert state["queue"] == 0


def test_a_lane_and_runs_on_the_same_shard_write_each_change_once(
    postgres, sources, instance, fake, tmp_path
) -> None:
    settings, (name, _) = sources
    sync_shards(settings, name, instance)
    lane = start_lane(
        Path(os.environ["EA_TEST_SOURCES"]), name, dagster_database(postgres), tmp_path / "l.log"
    )
    engine = engine_for(postgres)
    try:
        wait_until(lambda: lane_health(engine, name).up, "the lane to start")
        before = len(fake.requests)
        for version in range(12):  # row 1 changes while runs and the lane both sync it
            with engine.begin() as conn:
                conn.execute(sa.text(f"UPDATE {name} SET body = 'version {version}' WHERE id = 1"))
            if version % 3 == 0:
                sync_shards(settings, name, instance)
        wait_until(lambda: stored(postgres, name)["queue"] == 0, "the queue to drain")
        wait_until(
            lambda: (
                ("1", 0, "Doc 1: version 11") in [p[:3] for p in stored(postgres, name)["points"]]
            ),
            "the last version in Qdrant",
        )
    finally:
        os.killpg(lane.pid, signal.SIGTERM)
        lane.wait(timeout=30)
    embedded = [t for r in fake.requests[before:] for t in r.inputs]
    assert len(embedded) == len(set(embedded)), "a change was embedded twice"
    state = stored(postgres, name)
    assert [c[2] for c in state["chunks"] if c[0] == "1"] == ["Doc 1: version 11"]
    assert len(state["points"]) == len(state["chunks"]) == len(ROWS)
    assert lane.returncode == 0
