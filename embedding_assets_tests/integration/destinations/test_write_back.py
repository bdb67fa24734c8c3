"""The write-back destination against a real Postgres and the real local model: one vector per
row in a `vector(384)` column of the source table (or of a side table), kept right through
inserts, updates, rows leaving `where`, empty text, capture triggers, a row changed during a
run, a kill -9 inside the write, and a model change (blue/green columns)."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedding_assets.cli.main import main
from embedding_assets.cli.search import search_source
from embedding_assets.cli.status import status_report
from embedding_assets.config.settings import load_settings
from embedding_assets.destinations.column import ColumnDestination
from embedding_assets.destinations.column_schema import WriteBackError
from embedding_assets.state.db import engine_for
from embedding_assets.sync.chunk import chunk_rows
from embedding_assets.sync.embed import embed_chunks
from embedding_assets.sync.generations import runtime_for
from embedding_assets.sync.store import store_embeddings
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    create_login_role,
    dagster_database,
    fake_embedder_settings,
    materialization_metadata,
    queue_length,
    sync_shards,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration

LONG_BODY = " ".join(f"sentence {i} about vector search and databases." for i in range(40))
WRITE_BACK = "{column: embedding, model_column: embedding_model, embedded_at_column: embedded_at}"


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def execute(url: str, *statements: str) -> None:
    with engine_for(url).begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def column_vectors(url: str, table: str, column: str = "embedding") -> dict[int, np.ndarray | None]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(
            sa.text(f"SELECT id, CAST({column} AS text) AS v FROM {table} ORDER BY id")
        ).fetchall()
    return {
        r.id: None if r.v is None else np.array(json.loads(r.v), dtype=np.float32) for r in rows
    }


def chunk_vectors(url: str, runtime, row_id: int) -> np.ndarray:
    with engine_for(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT CAST(embedding AS text) AS v FROM {runtime.pgvector.table} "
                "WHERE row_id = :r ORDER BY chunk_index"
            ),
            {"r": str(row_id)},
        ).fetchall()
    return np.array([json.loads(r.v) for r in rows], dtype=np.float32)


def table_columns(url: str, table: str) -> list[str]:
    with engine_for(url).connect() as conn:
        query = "SELECT column_name FROM information_schema.columns WHERE table_name = :t"
        return list(conn.scalars(sa.text(query), {"t": table}))


def docs() -> list[dict]:
    rows = [
        {"id": i, "title": f"Doc {i}", "body": f"the body of document {i}"} for i in range(1, 9)
    ]
    rows.append({"id": 9, "title": "Long", "body": LONG_BODY})  # several chunks
    rows.append({"id": 10, "title": None, "body": None})  # empty text: no vector
    rows.append({"id": 11, "title": "Archived", "body": "old", "archived": True})  # not eligible
    return rows


def test_column_holds_one_vector_per_row_through_updates_where_and_triggers(
    postgres, home, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs())
    settings = write_settings(
        tmp_path, name, name, write_back=WRITE_BACK.replace("}", ", index: hnsw}")
    )
    runtime = runtime_for(settings, name, postgres)
    assert runtime.feed.mode == "trigger"
    results = sync_shards(settings, name, instance)

    vectors = column_vectors(postgres, name)
    assert [i for i, v in vectors.items() if v is not None] == list(range(1, 10))
    assert vectors[10] is None and vectors[11] is None  # empty text, outside `where`
    # One chunk: the chunk's vector. Several: their mean, renormalised (the default rule).
    np.testing.assert_allclose(vectors[1], chunk_vectors(postgres, runtime, 1)[0], atol=1e-6)
    chunks = chunk_vectors(postgres, runtime, 9)
    assert len(chunks) > 1
    mean = chunks.mean(axis=0)
    np.testing.assert_allclose(vectors[9], mean / np.linalg.norm(mean), atol=1e-5)
    with engine_for(postgres).connect() as conn:
        models = conn.execute(
            sa.text(f"SELECT DISTINCT embedding_model FROM {name} WHERE embedding IS NOT NULL")
        ).scalars()
        assert list(models) == [runtime.model_id]
        assert conn.scalar(sa.text(f"SELECT count(embedded_at) FROM {name}")) == 9
        assert conn.scalar(
            sa.text("SELECT to_regclass(:i) IS NOT NULL"),
            {"i": f"public.{runtime.column.index_name}"},
        )
    written = sum(
        materialization_metadata(r, "embeddings")["write_back_rows_written"]
        for r in results.values()
    )
    assert written == 10  # 9 vectors and row 10's NULL; row 11 is not eligible

    # The write-back set only vector columns: the capture triggers queued nothing, and a
    # second sync finds nothing to do.
    assert queue_length(postgres, runtime.target) == 0
    again = sync_shards(settings, name, instance)
    assert all(
        materialization_metadata(r, "embeddings")["rows_written"] == 0 for r in again.values()
    )
    assert status_report(settings, name)["column_rows"] == 9

    # An update recomputes the row's vector; a row leaving `where` gets NULL; a new row
    # gets one; a row whose text turns empty gets NULL.
    execute(
        postgres,
        f"UPDATE {name} SET body = 'a completely different text about gardening' WHERE id = 1",
        f"UPDATE {name} SET archived = true WHERE id = 2",
        f"UPDATE {name} SET title = NULL, body = NULL WHERE id = 3",
        f"INSERT INTO {name} (id, title, body) VALUES (12, 'New', 'a row inserted later')",
    )
    sync_shards(settings, name, instance)
    after = column_vectors(postgres, name)
    np.testing.assert_allclose(after[1], chunk_vectors(postgres, runtime, 1)[0], atol=1e-6)
    assert not np.allclose(after[1], vectors[1])
    assert after[2] is None and after[3] is None and after[12] is not None
    np.testing.assert_allclose(after[4], vectors[4])  # untouched rows keep theirs
    assert queue_length(postgres, runtime.target) == 0

    # Search through the column finds a row by its exact text first.
    hits = search_source(settings, name, "Doc 5: the body of document 5", 3, "column")
    assert hits[0]["row_id"] == "5" and hits[0]["score"] > 0.99
    assert hits[0]["text"] == "Doc 5: the body of document 5"
    cli = CliRunner().invoke(
        main,
        ["--sources", str(settings.path), "search", "Doc 6: the body of document 6"]
        + ["--source", name, "--backend", "column", "--json"],
    )
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)[0]["row_id"] == "6"


def test_a_row_changed_during_a_run_never_gets_the_stale_vector(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs()[:4])
    settings = write_settings(tmp_path, name, name, shards="1", write_back="{column: embedding}")
    sync_shards(settings, name, instance)
    runtime = runtime_for(settings, name, postgres)
    before = column_vectors(postgres, name)[1]

    execute(postgres, f"UPDATE {name} SET body = 'version two' WHERE id = 1")
    pending = runtime.feed.pending(0, 100)
    # The row changes again while this run embeds "version two".
    execute(postgres, f"UPDATE {name} SET body = 'version three' WHERE id = 1")
    stats = store_embeddings(
        runtime,
        embed_chunks(
            chunk_rows(pending, settings.source(name), runtime.embedder), runtime.embedder, {}
        ),
    )
    assert stats.metadata["write_back_rows_changed_since_read"] == 1
    assert stats.metadata["write_back_rows_written"] == 0
    np.testing.assert_allclose(column_vectors(postgres, name)[1], before)  # not "version two"

    sync_shards(settings, name, instance)
    three = runtime.embedder.embed_documents(["Doc 1: version three"])[0]
    np.testing.assert_allclose(column_vectors(postgres, name)[1], three, atol=1e-5)


def test_side_table_for_a_source_table_nobody_may_change(postgres, home, tmp_path, instance):
    """The source refuses every UPDATE (a trigger raises): the vectors go to a 1:1 side
    table keyed by the id, and the source table is left exactly as it was."""
    name = unique_name()
    create_docs_table(postgres, name, docs())
    execute(
        postgres,
        "CREATE OR REPLACE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN RAISE EXCEPTION 'read-only table'; END $$",
        f"CREATE TRIGGER {name}_read_only BEFORE UPDATE ON {name} "
        "FOR EACH ROW EXECUTE FUNCTION refuse_update()",
    )
    side = f"vectors.{name}_vectors"
    settings = write_settings(
        tmp_path, name, name, write_back=f"{{column: embedding, table: {side}}}"
    )
    columns_before = table_columns(postgres, name)
    sync_shards(settings, name, instance)
    vectors = column_vectors(postgres, side)
    assert [i for i, v in vectors.items() if v is not None] == list(range(1, 10))
    assert vectors.get(10) is None and 11 not in vectors
    columns_after = table_columns(postgres, name)
    assert columns_after == columns_before
    hits = search_source(settings, name, "Doc 7: the body of document 7", 1, "column")
    assert hits[0]["row_id"] == "7" and hits[0]["text"] == "Doc 7: the body of document 7"

    execute(postgres, f"DELETE FROM {name} WHERE id = 8")
    sync_shards(settings, name, instance)
    assert column_vectors(postgres, side)[8] is None


def test_a_role_that_may_not_alter_the_table_gets_the_sql_for_a_dba(postgres, home, tmp_path):
    from sqlalchemy.engine import make_url

    from embedding_assets.state.migrations import migrate

    name = unique_name()
    create_docs_table(postgres, name, docs()[:2])
    role = f"app_{name}"
    migrate(engine_for(postgres))
    # The role uses our schema and may update the source table, but may not alter it.
    execute(
        postgres,
        create_login_role(postgres, role),
        f"GRANT SELECT, UPDATE ON {name} TO {role}",
        f"GRANT USAGE ON SCHEMA embedding_assets TO {role}",
        f"GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA embedding_assets TO {role}",
    )
    as_app = engine_for(make_url(postgres).set(username=role).render_as_string(False))
    settings = write_settings(tmp_path, name, name, write_back=WRITE_BACK)
    column = ColumnDestination(as_app, settings.source(name), "t", 1)
    with as_app.begin() as conn, pytest.raises(WriteBackError) as error:
        column.prepare(conn, 384, live=True, enqueue=True)
    message = str(error.value)
    assert (
        f'ALTER TABLE "public"."{name}" ADD COLUMN IF NOT EXISTS "embedding" vector(384)' in message
    )
    assert '"embedded_at" timestamptz' in message and "GRANT UPDATE" in message
    # The DBA runs it; then the role may write.
    execute(postgres, *message.split("Ask a DBA to run:\n")[1].split("\nor set")[0].split(";\n"))
    with as_app.begin() as conn:
        column.prepare(conn, 384, live=True, enqueue=True)


def test_kill_9_inside_the_write_converges(postgres, home, tmp_path):
    """A real `sync` killed while its write transaction waits to update a source row: none
    of it is kept (chunks, ledger and column roll back together), readers keep the old
    vectors, and the next sync converges."""
    name = unique_name()
    create_docs_table(postgres, name, docs()[:6])
    dagster_url = dagster_database(postgres)
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(
            tmp_path, name, server.base_url, {}, {"shards": "1", "write_back": "{column: vec}"}
        )
        env = {**os.environ, "EMBEDDING_ASSETS_DAGSTER_PG_URL": dagster_url}
        command = [sys.executable, "-m", "embedding_assets.cli", "--sources", str(path), "sync"]
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr[-2000:]
        before = column_vectors(postgres, name, "vec")
        execute(postgres, f"UPDATE {name} SET body = 'second version'")
        engine = engine_for(postgres)
        locker = engine.connect()
        locker.begin()
        locker.execute(sa.text(f"SELECT * FROM {name} WHERE id = 3 FOR UPDATE"))
        process = subprocess.Popen(command, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while True:
                with engine.connect() as conn:
                    waiting = conn.scalar(
                        sa.text(
                            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = "
                            "'Lock' AND ltrim(query) LIKE :q"
                        ),
                        {"q": f'UPDATE "public"."{name}"%'},
                    )
                if waiting:
                    break
                assert process.poll() is None, "sync exited before its write"
                assert time.monotonic() < deadline, "the write never reached the column"
                time.sleep(0.1)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        finally:
            locker.rollback()
            locker.close()
        time.sleep(0.5)  # the server rolls back the dead client's transaction
        settings = load_settings(path)
        runtime = runtime_for(settings, name, postgres)
        for row_id, vector in column_vectors(postgres, name, "vec").items():
            np.testing.assert_allclose(vector, before[row_id])  # the old vectors, whole
        assert status_report(settings, name)["pending_rows"] == 6  # nothing was acknowledged
        again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
        after = column_vectors(postgres, name, "vec")
        for row_id in after:
            stored = chunk_vectors(postgres, runtime, row_id)[0]
            np.testing.assert_allclose(after[row_id], stored, atol=1e-6)
            assert not np.allclose(after[row_id], before[row_id])
        assert queue_length(postgres, runtime.target) == 0


def embedded_chunks(results) -> int:
    return sum(
        materialization_metadata(r, "embeddings")["embedded_chunks"] for r in results.values()
    )


def test_a_column_only_source_needs_no_chunk_table_and_still_reuses_chunks(
    postgres, home, tmp_path, instance
):
    from embedding_assets.definitions import build_definitions
    from embedding_assets.ops.environment import qdrant_store_from_env

    name = unique_name()
    create_docs_table(postgres, name, docs())
    settings = write_settings(
        tmp_path, name, name, write_back="{column: embedding}", pgvector="false", qdrant="false"
    )
    defs = build_definitions(settings)
    stages = {key.path[-1] for key in defs.resolve_all_asset_keys() if key.path[0] == name}
    assert stages == {"source", "pending_rows", "chunks", "embeddings"}
    results = sync_shards(settings, name, instance)
    for result in results.values():
        evaluations = result.get_asset_check_evaluations()
        assert evaluations and all(e.passed for e in evaluations), [
            (e.check_name, e.metadata) for e in evaluations if not e.passed
        ]
    first = embedded_chunks(results)
    vectors = column_vectors(postgres, name)
    assert [i for i, v in vectors.items() if v is not None] == list(range(1, 10))
    assert vectors[10] is None and vectors[11] is None
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(sa.text(f"SELECT to_regclass('{name}_embeddings')")) is None
    assert not qdrant_store_from_env().collection_exists(name)

    # A metadata-only change reuses every chunk (from the vector cache, as there is no chunk
    # table); a changed body embeds its one chunk; a row leaving `where` and a row whose text
    # turns empty get NULL.
    execute(
        postgres,
        f"UPDATE {name} SET category = 'other' WHERE id = 9",
        f"UPDATE {name} SET body = 'gardening in the rain' WHERE id = 1",
        f"UPDATE {name} SET archived = true WHERE id = 2",
        f"UPDATE {name} SET title = NULL, body = NULL WHERE id = 3",
    )
    results = sync_shards(settings, name, instance)
    assert embedded_chunks(results) == 1 < first
    after = column_vectors(postgres, name)
    assert after[2] is None and after[3] is None
    np.testing.assert_allclose(after[9], vectors[9], atol=1e-6)
    one = settings_embedder_vector(settings, name, "Doc 1: gardening in the rain")
    np.testing.assert_allclose(after[1], one, atol=1e-5)
    assert embedded_chunks(sync_shards(settings, name, instance)) == 0
    report = status_report(settings, name)
    assert (report["column_rows"], report["pending_rows"], report["qdrant_points"]) == (7, 0, 0)
    # The cache holds exactly the chunks the rows have now: the replaced ones are gone.
    with engine_for(postgres).connect() as conn:
        target = runtime_for(settings, name, postgres).target
        cached = conn.scalar(
            sa.text("SELECT count(*) FROM embedding_assets.vector_cache WHERE target = :t"),
            {"t": target},
        )
        used = conn.scalar(
            sa.text(
                "SELECT count(DISTINCT chunk_hash) FROM embedding_assets.row_chunks "
                "WHERE target = :t"
            ),
            {"t": target},
        )
    assert cached == used > 7
    hits = search_source(settings, name, "Doc 5: the body of document 5", 1, "column")
    assert hits[0]["row_id"] == "5"

    # A vector NULLed by hand is found by reconcile and written again from the cache.
    execute(postgres, f"UPDATE {name} SET embedding = NULL WHERE id = 4")
    queued_again, _ = runtime_for(settings, name, postgres).reconcile()
    assert queued_again == 1
    assert embedded_chunks(sync_shards(settings, name, instance)) == 0
    np.testing.assert_allclose(column_vectors(postgres, name)[4], vectors[4], atol=1e-6)


def settings_embedder_vector(settings, name: str, text: str) -> np.ndarray:
    runtime = runtime_for(settings, name, os.environ["DATABASE_URL"])
    vector = runtime.embedder.embed_documents([text])[0]
    return vector / np.linalg.norm(vector)


def test_adding_the_column_waits_briefly_behind_open_transactions_then_says_so(
    postgres, home, tmp_path
):
    """ALTER TABLE queues behind an application's open transaction, and the application's
    next queries would queue behind it: the column is added under a short lock timeout."""
    name = unique_name()
    create_docs_table(postgres, name, docs()[:2])
    settings = write_settings(tmp_path, name, name, write_back="{column: embedding}")
    engine = engine_for(postgres)
    column = ColumnDestination(engine, settings.source(name), "t", 1)
    reader = engine.connect()
    reader.begin()
    reader.execute(sa.text(f"SELECT count(*) FROM {name}"))  # an application's transaction
    try:
        started = time.monotonic()
        with (
            engine.begin() as conn,
            pytest.raises(WriteBackError, match="long transactions hold the table"),
        ):
            column.prepare(conn, 384, live=True, enqueue=True)
        assert time.monotonic() - started < 15
    finally:
        reader.rollback()
        reader.close()
    with engine.begin() as conn:
        column.prepare(conn, 384, live=True, enqueue=True)
    assert column_vectors(postgres, name) == {1: None, 2: None}
