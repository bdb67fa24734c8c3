"""Change capture against a real Postgres: trigger, watermark and diff feeds, reconciliation,
rows changed while a run is in flight, and the sensor's cost per tick."""

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.config.settings import load_settings
from embedding_assets.core.sharding import shard_of
from embedding_assets.definitions import build_definitions
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.sync.chunk import chunk_rows
from embedding_assets.sync.embed import embed_chunks
from embedding_assets.sync.generations import runtime_for
from embedding_assets.sync.store import store_embeddings
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    create_login_role,
    sync_shards,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration


def docs(n: int, start: int = 1) -> list[dict]:
    return [{"id": i, "title": f"Doc {i}", "body": f"body of {i}"} for i in range(start, start + n)]


def queued(url: str, target: str) -> list[tuple[int, str]]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT shard, row_id FROM embedding_assets.change_queue WHERE target = :t "
                "ORDER BY id"
            ),
            {"t": target},
        ).fetchall()
    return [(r.shard, r.row_id) for r in rows]


def stored(url: str, settings, name: str) -> dict[str, str]:
    """pgvector's row id -> chunk text, after checking Qdrant holds the same points."""
    runtime = runtime_for(settings, name, url)
    with engine_for(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT CAST(point_id AS text) AS pid, row_id, chunk_text "
                f"FROM {runtime.pgvector.table}"
            )
        ).fetchall()
    qdrant = qdrant_store_from_env()
    collection = settings.source(name).qdrant_collection
    points = qdrant.retrieve(collection, [r.pid for r in rows])
    assert qdrant.count(collection) == len(rows) == len(points)
    assert {p.id: p.payload["text"] for p in points} == {r.pid: r.chunk_text for r in rows}
    return {r.row_id: r.chunk_text for r in rows}


def execute(url: str, *statements: str) -> None:
    with engine_for(url).begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def test_triggers_queue_exactly_the_changes_the_source_uses(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs(10))
    execute(postgres, f"ALTER TABLE {name} ADD COLUMN notes text")
    settings = write_settings(tmp_path, name, name, shards="4")
    runtime = runtime_for(settings, name, postgres)
    target = settings.source(name).target
    runtime.feed.ensure()
    assert runtime.feed.mode == "trigger"
    # Installing the triggers queues what the first diff finds: every row.
    assert sorted(r for _, r in queued(postgres, target)) == sorted(str(i) for i in range(1, 11))
    sync_shards(settings, name, instance)
    assert queued(postgres, target) == []
    assert set(stored(postgres, settings, name)) == {str(i) for i in range(1, 11)}

    # Columns the source does not use, and writes that change nothing, queue nothing.
    execute(
        postgres,
        f"UPDATE {name} SET notes = 'unused'",
        f"UPDATE {name} SET body = body, views = views",
    )
    assert queued(postgres, target) == []

    execute(
        postgres,
        f"UPDATE {name} SET views = 7 WHERE id = 1",  # metadata column
        f"UPDATE {name} SET body = 'new body' WHERE id = 2",  # template column
        f"UPDATE {name} SET archived = true WHERE id = 3",  # leaves `where`
        f"INSERT INTO {name} (id, title, body) VALUES (11, 'Eleven', 'fresh')",
        f"DELETE FROM {name} WHERE id = 4",
        f"UPDATE {name} SET id = 100 WHERE id = 5",  # an id change: old id goes, new comes
    )
    entries = queued(postgres, target)
    assert sorted(r for _, r in entries) == sorted(["1", "2", "3", "11", "4", "5", "100"])
    assert all(shard == shard_of(row, 4) for shard, row in entries)

    sync_shards(settings, name, instance)
    assert queued(postgres, target) == []
    state = stored(postgres, settings, name)
    assert set(state) == {"1", "2", "6", "7", "8", "9", "10", "11", "100"}
    assert "new body" in state["2"]

    execute(postgres, f"UPDATE {name} SET archived = false WHERE id = 3")  # comes back
    assert [r for _, r in queued(postgres, target)] == ["3"]
    sync_shards(settings, name, instance)
    assert "3" in stored(postgres, settings, name)

    # TRUNCATE queues every stored row, so the next runs empty both sinks.
    execute(postgres, f"TRUNCATE {name}")
    assert len(queued(postgres, target)) == 10
    sync_shards(settings, name, instance)
    assert stored(postgres, settings, name) == {}
    assert not any(w.has_work for w in runtime.exact_work().values())
    assert not any(w.has_work for w in runtime.work().values())


def test_row_changed_during_a_run_is_embedded_by_the_next_and_nothing_twice(
    postgres, home, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs(6))
    settings = write_settings(tmp_path, name, name, shards="1")
    sync_shards(settings, name, instance)
    runtime = runtime_for(settings, name, postgres)
    spec = settings.source(name)

    execute(postgres, f"UPDATE {name} SET body = 'version two' WHERE id = 1")
    pending = runtime.feed.pending(0, 100)
    assert pending.rows["row_id"].tolist() == ["1"]
    # The row changes again while this run embeds its first version.
    execute(postgres, f"UPDATE {name} SET body = 'version three' WHERE id = 1")
    chunked = chunk_rows(pending, spec, runtime.embedder)
    store_embeddings(runtime, embed_chunks(chunked, runtime.embedder, {}))
    assert "version two" in stored_text(postgres, runtime, "1")
    assert [r for _, r in queued(postgres, spec.target)] == ["1"]  # the later change stays

    result = sync_shards(settings, name, instance)["00"]
    embedded = [
        e.event_specific_data.materialization.metadata["embedded_chunks"].value
        for e in result.get_asset_materialization_events()
        if e.event_specific_data.materialization.asset_key.path[-1] == "embeddings"
    ]
    assert embedded == [1]  # only row 1's new text; the five unchanged rows cost nothing
    assert "version three" in stored(postgres, settings, name)["1"]
    assert queued(postgres, spec.target) == []


def stored_text(url: str, runtime, row_id: str) -> str:
    with engine_for(url).connect() as conn:
        return conn.scalar(
            sa.text(f"SELECT chunk_text FROM {runtime.pgvector.table} WHERE row_id = :r"),
            {"r": row_id},
        )


def test_changes_that_bypass_the_triggers_are_found_by_reconcile(
    postgres, home, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs(8))
    settings = write_settings(tmp_path, name, name, shards="2")
    sync_shards(settings, name, instance)
    runtime = runtime_for(settings, name, postgres)
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
        conn.execute(sa.text(f"UPDATE {name} SET body = 'changed quietly' WHERE id = 2"))
        conn.execute(sa.text(f"INSERT INTO {name} (id, title, body) VALUES (50, 'New', 'quiet')"))
        conn.execute(sa.text(f"DELETE FROM {name} WHERE id = 3"))
    assert queued(postgres, settings.source(name).target) == []
    assert not any(w.has_work for w in runtime.work().values())  # the feed saw nothing

    assert runtime.feed.reconcile() == 3
    assert sorted(r for _, r in queued(postgres, settings.source(name).target)) == ["2", "3", "50"]
    assert runtime.feed.reconcile() == 3  # queued once, however often it runs
    assert len(queued(postgres, settings.source(name).target)) == 3
    sync_shards(settings, name, instance)
    state = stored(postgres, settings, name)
    assert "3" not in state and "50" in state and "changed quietly" in state["2"]
    assert not any(w.has_work for w in runtime.exact_work().values())


def test_watermark_source_picks_up_updates_and_reconcile_removes_deletes(
    postgres, home, tmp_path, instance
):
    name = unique_name()
    execute(
        postgres,
        f"""CREATE TABLE {name} (id integer PRIMARY KEY, title text, body text,
            category text DEFAULT 'misc', views integer DEFAULT 0,
            archived boolean NOT NULL DEFAULT false,
            updated_at timestamptz NOT NULL DEFAULT now())""",
        f"CREATE INDEX ON {name} (updated_at)",
        f"INSERT INTO {name} (id, title, body) "
        "SELECT i, 'Doc ' || i, 'body of ' || i FROM generate_series(1, 12) AS i",
    )
    settings = write_settings(
        tmp_path,
        name,
        name,
        shards="3",
        change_capture="watermark",
        watermark_column="updated_at",
    )
    runtime = runtime_for(settings, name, postgres)
    assert runtime.feed.mode == "watermark"
    assert {s for s, w in runtime.work().items() if w.has_work} == {0, 1, 2}
    sync_shards(settings, name, instance)
    assert not any(w.has_work for w in runtime.work().values())
    assert len(stored(postgres, settings, name)) == 12

    execute(postgres, f"UPDATE {name} SET body = 'edited', updated_at = now() WHERE id = 5")
    work = runtime.work()
    assert [s for s, w in work.items() if w.has_work] == [shard_of("5", 3)]
    assert work[shard_of("5", 3)].pending_rows == 1
    sync_shards(settings, name, instance)
    assert "edited" in stored(postgres, settings, name)["5"]

    # A delete leaves no trace a watermark can see; reconciliation finds it.
    execute(postgres, f"DELETE FROM {name} WHERE id = 7")
    sync_shards(settings, name, instance)
    assert "7" in stored(postgres, settings, name)
    assert runtime.feed.reconcile() == 1
    sync_shards(settings, name, instance)
    assert "7" not in stored(postgres, settings, name)
    assert not any(w.has_work for w in runtime.exact_work().values())


def test_query_source_over_a_join_converges_through_diff(postgres, home, tmp_path, instance):
    name = unique_name()
    execute(
        postgres,
        f"CREATE TABLE {name}_authors (id integer PRIMARY KEY, author text)",
        f"CREATE TABLE {name}_posts (id integer PRIMARY KEY, author_id integer, title text)",
        f"INSERT INTO {name}_authors VALUES (1, 'Ada'), (2, 'Grace')",
        f"INSERT INTO {name}_posts VALUES (1, 1, 'Engines'), (2, 2, 'Compilers'), (3, 1, 'Notes')",
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "embedders: {local: {provider: sentence_transformers}}\n"
        f"sources:\n  - name: {name}\n"
        f"    query: SELECT p.id, p.title, a.author FROM {name}_posts p "
        f"JOIN {name}_authors a ON a.id = p.author_id\n"
        "    text: '{title} by {author}'\n    shards: 2\n"
    )
    settings = load_settings(path)
    runtime = runtime_for(settings, name, postgres)
    assert runtime.feed.mode == "diff"
    sync_shards(settings, name, instance)
    assert stored(postgres, settings, name) == {
        "1": "Engines by Ada",
        "2": "Compilers by Grace",
        "3": "Notes by Ada",
    }
    execute(postgres, f"UPDATE {name}_authors SET author = 'Ada Lovelace' WHERE id = 1")
    execute(postgres, f"DELETE FROM {name}_posts WHERE id = 2")
    sync_shards(settings, name, instance)
    assert stored(postgres, settings, name) == {
        "1": "Engines by Ada Lovelace",
        "3": "Notes by Ada Lovelace",
    }


def test_a_role_without_trigger_privilege_gets_the_sql_and_a_dba_install_works(
    postgres, home, tmp_path
):
    from sqlalchemy.engine import make_url

    from embedding_assets.state.capture import resolve_mode
    from embedding_assets.state.diff import SourceDiff
    from embedding_assets.state.migrations import migrate
    from embedding_assets.state.queue import ChangeQueue
    from embedding_assets.state.trigger_feed import TriggerFeed
    from embedding_assets.state.triggers import TriggerPrivilegeError

    name = unique_name()
    create_docs_table(postgres, name, docs(3))
    role = f"app_{name}"
    # Our role reads the source and uses our schema, but may not create triggers on the table.
    migrate(engine_for(postgres))
    execute(
        postgres,
        create_login_role(postgres, role),
        f"GRANT SELECT, INSERT ON {name} TO {role}",
        f"GRANT USAGE ON SCHEMA embedding_assets TO {role}",
    )
    as_app = engine_for(make_url(postgres).set(username=role).render_as_string(False))
    settings = write_settings(tmp_path, name, name, change_capture="trigger")
    spec = settings.source(name)
    assert resolve_mode(as_app, spec.model_copy(update={"change_capture": "auto"})) == "diff"

    feed = TriggerFeed(
        as_app, spec, SourceDiff(as_app, spec, spec.target, "v"), ChangeQueue(as_app, spec.target)
    )
    with as_app.connect() as conn, pytest.raises(TriggerPrivilegeError) as error:
        feed.install(conn, feed.triggers(conn))
    message = str(error.value)
    assert "may not create triggers" in message and "CREATE TRIGGER" in message
    assert "CREATE SCHEMA IF NOT EXISTS embedding_assets" in message

    # A DBA runs that SQL; the application's role needs no privilege on our schema.
    with engine_for(postgres).begin() as conn:
        from embedding_assets.state.ddl import execute_script

        with as_app.connect() as app_conn:
            dba_sql = feed.triggers(app_conn).dba_sql(role)
        execute_script(conn, dba_sql)
    assert resolve_mode(as_app, spec.model_copy(update={"change_capture": "auto"})) == "trigger"
    # The trigger fills the queue of each registered generation: register the first.
    runtime_for(settings, name, postgres)
    execute(as_app.url.render_as_string(False), f"INSERT INTO {name} (id, title) VALUES (9, 'x')")
    assert queued(postgres, spec.target) == [(shard_of("9", spec.shards), "9")]
    as_app.dispose()


def sensor_tick_statements(url: str, tmp_path, instance, size: int) -> list[str]:
    """The SQL one warm sensor tick sends to the data database, with one row changed in a
    synced table of `size` rows."""
    name = unique_name()
    create_docs_table(url, name, docs(size))
    settings = write_settings(tmp_path, name, name, shards="8")
    sync_shards(settings, name, instance)
    execute(url, f"UPDATE {name} SET body = 'changed' WHERE id = 3")
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def(f"{name}_changes")

    def tick(cursor=None):
        with dg.build_sensor_context(
            instance=instance, resources=defs.resources, definitions=defs, cursor=cursor
        ) as context:
            return sensor.evaluate_tick(context)

    # Warm: the triggers are checked once per process, and the destinations are audited
    # (once a minute: the cursor says when it last happened).
    cursor = tick().cursor
    statements: list[str] = []

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    engine = engine_for(url)
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        result = tick(cursor)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert [r.tags["embedding_assets/shards"] for r in result.run_requests] == [
        f"{shard_of('3', 8):02d}"
    ]
    # The tick reads the queue, the error table's due rows and the ledger's lag index,
    # never the source table.
    assert not [s for s in statements if f"public.{name}" in s or f'"{name}"' in s]
    return statements


def test_sensor_tick_costs_a_bounded_number_of_queries_whatever_the_table_size(
    postgres, home, tmp_path, instance
):
    small = sensor_tick_statements(postgres, tmp_path, instance, 20)
    large = sensor_tick_statements(postgres, tmp_path, instance, 3000)
    # 6: the lag query sets its plan (`use_partial_index`) in a statement of its own; 7:
    # the live lane's heartbeat is read (a queue age only while a lane is up).
    assert len(small) == len(large) <= 7, (small, large)
