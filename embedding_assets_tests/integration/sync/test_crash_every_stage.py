"""kill -9 of a real `embedding-assets sync` process at every stage of a shard run, each
followed by the normal path: a new `sync` on the same Dagster instance (Postgres-backed,
as `dev` uses) must not wait for the dead run's pool slots, and must converge with no
duplicate chunk, no orphan point, no stale text, an empty change queue and no slot claimed.

Each stage is paused deterministically, never by timing: a lock the run must wait for
(a table, the queue rows, ledger rows, the embedded Qdrant store's flock) or an embedder
request that hangs. The embedder is an OpenAI-compatible fake on 127.0.0.1 (real HTTP).
"""

import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.config.settings import load_settings
from embedding_assets.ops.environment import qdrant_path, qdrant_store_from_env
from embedding_assets.ops.run_health import WORKER_LOST_TAG
from embedding_assets.state.db import engine_for
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    dagster_database,
    fake_embedder_settings,
    unique_name,
)

pytestmark = pytest.mark.integration

WAIT_SECONDS = 120
ROWS = 30
CHANGED = 5  # rows 1..5 get a new body before the killed sync
POOLS = ("embedder_fake", "qdrant_embedded")


def settings_file(tmp_path: Path, name: str, url: str) -> Path:
    return fake_embedder_settings(tmp_path, name, url, {"timeout_seconds": "20"}, {"shards": "1"})


@pytest.fixture
def dagster_url(postgres) -> str:
    """A Dagster instance database of this test only: its runs and slots are the test's."""
    return dagster_database(postgres)


def run_sync(path: Path, name: str, dagster_url: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "--sources", str(path)]
        + ["sync", "--source", name],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDDING_ASSETS_DAGSTER_PG_URL": dagster_url},
        start_new_session=True,
        **popen,
    )


def wait_for(condition: Callable[[], bool], process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"sync exited ({process.returncode}) before {what}"
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def waiting_on_lock(url: str, query_prefix: str) -> Callable[[], bool]:
    def check() -> bool:
        with engine_for(url).connect() as conn:
            return bool(
                conn.scalar(
                    sa.text(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND ltrim(query) LIKE :q AND pid <> pg_backend_pid()"
                    ),
                    {"q": query_prefix + "%"},
                )
            )

    return check


@contextmanager
def held(url: str, *statements: str, params: dict | None = None) -> Iterator[None]:
    """A transaction holding the locks `statements` take, until the block ends."""
    conn = engine_for(url).connect()
    conn.begin()
    try:
        for statement in statements:
            conn.execute(sa.text(statement), params or {})
        yield
    finally:
        conn.rollback()
        conn.close()


@contextmanager
def qdrant_flock(collection: str) -> Iterator[Callable[[], None]]:
    """Hold the embedded store's lock (the run's Qdrant step waits); yields a release."""
    path = qdrant_path() / f".{collection}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            released = True

    try:
        yield release
    finally:
        release()


def kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def row_hash(url: str, target: str) -> str | None:
    with engine_for(url).connect() as conn:
        return conn.scalar(
            sa.text(
                "SELECT content_hash FROM embedding_assets.row_state "
                "WHERE target = :t AND row_id = '1'"
            ),
            {"t": target},
        )


def pgvector_written(ctx) -> Callable[[], bool]:
    """The killed run's pgvector transaction has committed (row 1's new text is stored)."""
    return lambda: row_hash(ctx.url, ctx.target) != ctx.old_hash


def pause_reading(ctx) -> None:
    with held(ctx.url, f"LOCK TABLE {ctx.name} IN ACCESS EXCLUSIVE MODE"):
        ctx.start()
        # Whatever reads the source first (its column types, then the pending rows) waits.
        ctx.wait(waiting_on_lock(ctx.url, f"%{ctx.name}"), "the pending rows read")
        ctx.kill()


def pause_embedding(ctx) -> None:
    ctx.server.slow_text = "Doc 1: second"
    ctx.server.slow_seconds = 60
    ctx.start()
    ctx.wait(
        lambda: any("Doc 1: second" in r.inputs for r in ctx.server.requests),
        "the embedder request",
    )
    ctx.kill()
    ctx.server.slow_text = None


def pause_pgvector_write(ctx) -> None:
    # The write's last statement before COMMIT (after chunks and ledger) waits for these.
    with held(
        ctx.url,
        "SELECT id FROM embedding_assets.change_queue WHERE target = :t FOR UPDATE",
        params={"t": ctx.target},
    ):
        ctx.start()
        ctx.wait(
            waiting_on_lock(ctx.url, "DELETE FROM embedding_assets.change_queue"),
            "the write transaction",
        )
        ctx.kill()


def pause_between_pgvector_and_qdrant(ctx) -> None:
    with qdrant_flock(ctx.collection):
        ctx.start()
        ctx.wait(pgvector_written(ctx), "the pgvector write")
        time.sleep(0.5)  # the Qdrant step is waiting for the store
        ctx.kill()


def pause_qdrant_write(ctx) -> None:
    """Qdrant has the new points; the run is recording that in the ledger."""
    with qdrant_flock(ctx.collection) as release:
        ctx.start()
        ctx.wait(pgvector_written(ctx), "the pgvector write")
        with held(
            ctx.url,
            "SELECT row_id FROM embedding_assets.row_state WHERE target = :t FOR UPDATE",
            params={"t": ctx.target},
        ):
            release()
            ctx.wait(
                waiting_on_lock(ctx.url, "UPDATE embedding_assets.row_state AS s SET"),
                "the Qdrant write's ledger update",
            )
            ctx.kill()


def pause_checks(ctx) -> None:
    """The Qdrant write is recorded; a check reading the pgvector table waits."""
    with qdrant_flock(ctx.collection) as release:
        ctx.start()
        ctx.wait(pgvector_written(ctx), "the pgvector write")
        ledger = held(
            ctx.url,
            "SELECT row_id FROM embedding_assets.row_state WHERE target = :t FOR UPDATE",
            params={"t": ctx.target},
        )
        ledger.__enter__()
        try:
            release()
            ctx.wait(
                waiting_on_lock(ctx.url, "UPDATE embedding_assets.row_state AS s SET"),
                "the Qdrant write's ledger update",
            )
            with held(ctx.url, f"LOCK TABLE {ctx.chunk_table} IN ACCESS EXCLUSIVE MODE"):
                ledger.__exit__(None, None, None)
                ledger = None
                ctx.wait(waiting_on_lock(ctx.url, "SELECT"), "a check")
                ctx.kill()
        finally:
            if ledger is not None:
                ledger.__exit__(None, None, None)


STAGES = {
    "reading_pending_rows": pause_reading,
    "embedding": pause_embedding,
    "pgvector_write_transaction": pause_pgvector_write,
    "between_pgvector_and_qdrant": pause_between_pgvector_and_qdrant,
    "qdrant_write": pause_qdrant_write,
    "checks": pause_checks,
}


class Crash:
    def __init__(self, url, name, path, dagster_url, server, runtime):
        self.url, self.name, self.path, self.dagster_url = url, name, path, dagster_url
        self.server, self.runtime = server, runtime
        self.target = runtime.target
        self.collection = runtime.qdrant.collection
        self.chunk_table = runtime.pgvector.table
        self.old_hash = row_hash(url, self.target)
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = run_sync(
            self.path,
            self.name,
            self.dagster_url,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def wait(self, condition: Callable[[], bool], what: str) -> None:
        assert self.process is not None
        wait_for(condition, self.process, what)

    def kill(self) -> None:
        assert self.process is not None
        kill(self.process)


def stored(url: str, runtime) -> list[tuple[str, int, str]]:
    with engine_for(url).connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    f"SELECT row_id, chunk_index, chunk_text FROM {runtime.pgvector.table} "
                    "ORDER BY row_id, chunk_index"
                )
            )
        ]


def assert_converged(url: str, runtime) -> None:
    expected = {str(i): f"Doc {i}: {'second' if i <= CHANGED else 'first'}" for i in range(1, 31)}
    chunks = stored(url, runtime)
    assert len(chunks) == len({(r, i) for r, i, _ in chunks}) == ROWS  # no duplicate chunk
    assert {r: t for r, _, t in chunks} == expected
    with engine_for(url).connect() as conn:
        ids = list(
            conn.scalars(sa.text(f"SELECT CAST(point_id AS text) FROM {runtime.pgvector.table}"))
        )
        queued = conn.scalar(
            sa.text("SELECT count(*) FROM embedding_assets.change_queue WHERE target = :t"),
            {"t": runtime.target},
        )
    store = qdrant_store_from_env()
    collection = runtime.qdrant.collection
    assert store.count(collection) == len(ids)  # no orphan point
    points = store.retrieve(collection, ids)
    assert {h.payload["row_id"]: h.payload["text"] for h in points} == expected
    assert queued == 0
    assert not any(w.has_work for w in runtime.exact_work().values())
    with dg.DagsterInstance.get() as instance:
        for pool in POOLS:
            info = instance.event_log_storage.get_concurrency_info(pool)
            assert not info.claimed_slots and not info.pending_steps, (pool, info)
        runs = instance.get_runs()
    statuses = {r.status for r in runs}
    assert dg.DagsterRunStatus.STARTED not in statuses  # the killed run is not in flight
    assert any(r.tags.get(WORKER_LOST_TAG) == "true" for r in runs)


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_at_every_stage_then_sync_converges(
    postgres, home, tmp_path, dagster_url, stage, monkeypatch
):
    from embedding_assets.ops.environment import prepare_dagster_home

    monkeypatch.setenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", dagster_url)
    prepare_dagster_home()  # the test reads the instance the CLI writes
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"Doc {i}", "body": "first"} for i in range(1, 31)]
    )
    with ProviderServer("openai", dim=8) as server:
        path = settings_file(tmp_path, name, server.base_url)
        settings = load_settings(path)
        first = run_sync(path, name, dagster_url)
        assert first.wait(timeout=WAIT_SECONDS) == 0
        runtime = runtime_for(settings, name, postgres)
        with engine_for(postgres).begin() as conn:
            conn.execute(sa.text(f"UPDATE {name} SET body = 'second' WHERE id <= {CHANGED}"))
        crash = Crash(postgres, name, path, dagster_url, server, runtime)
        STAGES[stage](crash)
        time.sleep(0.5)  # the server rolls back the dead client's transactions
        # The normal path: a new sync on the same instance. It must not wait for the dead
        # run's slots (it used to wait forever), and it says what it did about them.
        again = run_sync(
            path, name, dagster_url, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        out, err = again.communicate(timeout=WAIT_SECONDS)
        assert again.returncode == 0, (out, err)
        assert "whose process is gone" in err, err
        assert_converged(postgres, runtime)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_sync_waiting_for_a_live_runs_slot_stops_on_a_signal(
    postgres, home, tmp_path, dagster_url, monkeypatch, sig
):
    """A live run (this test process) holds the embedded Qdrant slot: `sync` waits for it,
    and Ctrl-C or SIGTERM stops it at once, its own run failed and its slots freed."""
    import uuid

    from embedding_assets.ops.environment import prepare_dagster_home

    monkeypatch.setenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", dagster_url)
    prepare_dagster_home()
    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "Doc 1", "body": "first"}])
    with ProviderServer("openai", dim=8) as server, dg.DagsterInstance.get() as instance:
        path = settings_file(tmp_path, name, server.base_url)
        instance.event_log_storage.set_concurrency_slots("qdrant_embedded", 1)
        holder_id = str(uuid.uuid4())  # a run elsewhere, alive, holding the store's slot
        instance.event_log_storage.claim_concurrency_slot("qdrant_embedded", holder_id, "step")
        process = run_sync(path, name, dagster_url, stderr=subprocess.PIPE, text=True)
        try:

            def waiting() -> bool:
                info = instance.event_log_storage.get_concurrency_info("qdrant_embedded")
                return any(step.run_id != holder_id for step in info.pending_steps)

            wait_for(waiting, process, "the sync to wait for the slot")
            os.killpg(process.pid, sig)
            _, err = process.communicate(timeout=20)
        finally:
            if process.poll() is None:
                kill(process)
        assert process.returncode == 128 + sig, err[-3000:]
        assert "marked failed and its pool slots freed" in err, err[-1500:]
        info = instance.event_log_storage.get_concurrency_info("qdrant_embedded")
        assert [s.run_id for s in info.claimed_slots] == [holder_id]  # only the live one
        assert all(step.run_id == holder_id for step in info.pending_steps)
        runs = instance.get_runs(dg.RunsFilter(job_name=f"{name}_sync_shards"))
        assert [r.status for r in runs] == [dg.DagsterRunStatus.FAILURE]


def test_two_syncs_of_one_shard_embed_each_row_once(
    postgres, home, tmp_path, dagster_url, monkeypatch
):
    """The second sync waits for the first one's write, then finds the work done."""
    from embedding_assets.ops.environment import prepare_dagster_home

    monkeypatch.setenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", dagster_url)
    prepare_dagster_home()
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"Doc {i}", "body": "first"} for i in range(1, 31)]
    )
    with ProviderServer("openai", dim=8) as server:
        path = settings_file(tmp_path, name, server.base_url)
        server.slow_text, server.slow_seconds = "Doc 1: first", 3  # the first sync is slow
        first = run_sync(path, name, dagster_url, stdout=subprocess.DEVNULL)
        wait_for(
            lambda: any("Doc 1: first" in r.inputs for r in server.requests),
            first,
            "the first sync's embedder request",
        )
        second = run_sync(path, name, dagster_url, stdout=subprocess.DEVNULL)
        assert first.wait(timeout=WAIT_SECONDS) == 0
        assert second.wait(timeout=WAIT_SECONDS) == 0
        embedded = [text for r in server.requests for text in r.inputs]
        assert sorted(embedded) == sorted(f"Doc {i}: first" for i in range(1, 31))
        runtime = runtime_for(load_settings(path), name, postgres)
        assert len(stored(postgres, runtime)) == 30
