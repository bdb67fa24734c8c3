"""kill -9 of a real `embedding-assets sync` process at the two moments the change feed must
survive: inside the write transaction (chunks, ledger and queue acknowledgement written but
not committed), and between the pgvector and the Qdrant write. The next run converges."""

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.environment import qdrant_path
from embedding_assets.runtime import qdrant_store_from_env, runtime_for
from embedding_assets.state.db import engine_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    sync_shards,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration

WAIT_SECONDS = 180


def start_sync(settings_path: Path, name: str, dagster_url: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "--sources", str(settings_path)]
        + ["sync", "--source", name],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDDING_ASSETS_DAGSTER_PG_URL": dagster_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"sync exited ({process.returncode}) before {what}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def texts(url: str, runtime) -> dict[str, str]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(sa.text(f"SELECT row_id, chunk_text FROM {runtime.pgvector.table}"))
        return {r.row_id: r.chunk_text for r in rows}


def qdrant_texts(url: str, settings, name: str) -> dict[str, str]:
    """Qdrant's payload text of every point pgvector holds (point ids are deterministic)."""
    runtime = runtime_for(settings, name, url)
    with engine_for(url).connect() as conn:
        ids = conn.scalars(sa.text(f"SELECT CAST(point_id AS text) FROM {runtime.pgvector.table}"))
        ids = list(ids)
    store = qdrant_store_from_env()
    collection = settings.source(name).qdrant_collection
    assert store.count(collection) == len(ids)
    return {h.payload["row_id"]: h.payload["text"] for h in store.retrieve(collection, ids)}


def queue_length(url: str, target: str) -> int:
    with engine_for(url).connect() as conn:
        return conn.scalar(
            sa.text("SELECT count(*) FROM embedding_assets.change_queue WHERE target = :t"),
            {"t": target},
        )


@pytest.fixture
def dagster_url(postgres) -> str:
    """A throwaway Dagster instance database: the killed run stays STARTED there, holding
    its pool slot (a known gap: the next run on that instance would wait for it)."""
    from sqlalchemy.engine import make_url

    database = unique_name("dagster")
    with engine_for(postgres).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text(f"CREATE DATABASE {database}")
        )
    url = make_url(postgres).set(drivername="postgresql+psycopg2", database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture
def synced(postgres, home, tmp_path):
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"Doc {i}", "body": "first"} for i in range(1, 31)]
    )
    settings = write_settings(tmp_path, name, name, shards="1")
    with dg.DagsterInstance.ephemeral() as instance:
        sync_shards(settings, name, instance)
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"UPDATE {name} SET body = 'second' WHERE id <= 5"))
    return name, settings, tmp_path / f"{name}.yaml"


def converge_and_check(postgres, settings, name: str) -> None:
    with dg.DagsterInstance.ephemeral() as instance:
        sync_shards(settings, name, instance)
    runtime = runtime_for(settings, name, postgres)
    expected = {str(i): f"Doc {i}: {'second' if i <= 5 else 'first'}" for i in range(1, 31)}
    assert texts(postgres, runtime) == expected
    assert qdrant_texts(postgres, settings, name) == expected
    assert queue_length(postgres, settings.source(name).target) == 0
    assert not any(w.has_work for w in runtime.exact_work().values())


def test_kill_inside_the_write_transaction_loses_nothing(postgres, synced, dagster_url):
    name, settings, path = synced
    target = settings.source(name).target
    runtime = runtime_for(settings, name, postgres)
    assert queue_length(postgres, target) == 5
    # Hold the queue entries: the run's acknowledgement (its last statement before COMMIT,
    # after the chunks and the ledger are written) waits on them.
    holder = engine_for(postgres).connect()
    holder.begin()
    holder.execute(
        sa.text("SELECT id FROM embedding_assets.change_queue WHERE target = :t FOR UPDATE"),
        {"t": target},
    )
    process = start_sync(path, name, dagster_url)
    try:

        def acknowledging() -> bool:
            with engine_for(postgres).connect() as conn:
                return bool(
                    conn.scalar(
                        sa.text(
                            """SELECT count(*) FROM pg_stat_activity
                            WHERE wait_event_type = 'Lock'
                            AND query LIKE 'DELETE FROM embedding_assets.change_queue%'"""
                        )
                    )
                )

        wait_for(acknowledging, process, "the run to acknowledge its queue entries")
        kill(process)
    finally:
        holder.rollback()
        holder.close()
        if process.poll() is None:
            kill(process)
    time.sleep(1)  # the server rolls the dead client's transaction back
    assert queue_length(postgres, target) == 5
    assert set(texts(postgres, runtime).values()) >= {"Doc 1: first"}
    converge_and_check(postgres, settings, name)


def test_kill_between_pgvector_and_qdrant_converges(postgres, synced, dagster_url):
    name, settings, path = synced
    runtime = runtime_for(settings, name, postgres)
    collection = settings.source(name).qdrant_collection
    lock_path = qdrant_path() / f".{collection}.lock"
    lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)  # the run's vector_index waits for the embedded store
    process = start_sync(path, name, dagster_url)
    try:

        def pgvector_written() -> bool:
            return texts(postgres, runtime).get("1") == "Doc 1: second"

        wait_for(pgvector_written, process, "the pgvector write")
        time.sleep(1)
        kill(process)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
        if process.poll() is None:
            kill(process)
    assert qdrant_texts(postgres, settings, name)["1"] == "Doc 1: first"  # Qdrant lags behind
    assert runtime.work()[0].qdrant_lag_rows == 5
    converge_and_check(postgres, settings, name)
