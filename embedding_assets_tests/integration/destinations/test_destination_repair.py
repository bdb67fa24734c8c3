"""A destination that lost data is found and repaired by the normal path: a TRUNCATE of
the pgvector table, chunk rows deleted by hand, the embedded Qdrant store removed, or
both sinks lost at once. What Qdrant still holds is copied back, not embedded again, and
`status` never counts a row as embedded that a sink lacks."""

import json
import shutil

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedding_assets.cli.main import main
from embedding_assets.config.settings import load_settings
from embedding_assets.definitions import build_definitions
from embedding_assets.ops.environment import qdrant_path, qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    unique_name,
)

pytestmark = pytest.mark.integration

ROWS = 40


@pytest.fixture
def synced(postgres, home, tmp_path):
    name = unique_name()
    create_docs_table(
        postgres,
        name,
        [{"id": i, "title": f"Doc {i}", "body": f"about {i}"} for i in range(1, ROWS + 1)],
    )
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(tmp_path, name, server.base_url, {}, {"shards": "4"})
        settings = load_settings(path)
        assert cli(path, "sync", "--source", name).exit_code == 0
        yield name, path, settings, server, runtime_for(settings, name, postgres)


def cli(path, *args: str):
    return CliRunner().invoke(main, ["--sources", str(path), *args])


def status(path, name: str) -> dict:
    result = cli(path, "status", "--source", name, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)[0]


def execute(url: str, sql: str) -> None:
    with engine_for(url).begin() as conn:
        conn.execute(sa.text(sql))


def assert_complete(url: str, runtime) -> None:
    """Both sinks hold every row's chunk, and status says so."""
    with engine_for(url).connect() as conn:
        ids = list(
            conn.scalars(sa.text(f"SELECT CAST(point_id AS text) FROM {runtime.pgvector.table}"))
        )
    assert len(ids) == ROWS
    store = qdrant_store_from_env()
    assert store.count(runtime.qdrant.collection) == ROWS
    assert len(store.retrieve(runtime.qdrant.collection, ids)) == ROWS


def test_truncated_pgvector_is_restored_from_qdrant_without_embedding(postgres, synced):
    name, path, _, server, runtime = synced
    execute(postgres, f"TRUNCATE {runtime.pgvector.table}")
    report = status(path, name)
    assert report["embedded_rows"] == 0 and report["pgvector_chunks"] == ROWS  # ledger's
    assert report["pending_rows"] == ROWS
    requests = len(server.requests)
    result = cli(path, "sync", "--source", name)
    assert result.exit_code == 0, result.output
    assert "rows to restore" not in result.output  # status already marked the loss
    assert len(server.requests) == requests  # copied from Qdrant: nothing embedded again
    assert_complete(postgres, runtime)
    after = status(path, name)
    assert (after["embedded_rows"], after["pending_rows"]) == (ROWS, 0)
    exact = cli(path, "status", "--source", name, "--exact", "--json")
    shards = json.loads(exact.output)[0]["shards"].values()
    assert all(s["pgvector_chunks"] == s["qdrant_points"] for s in shards)


def test_chunks_deleted_by_hand_are_restored_and_stray_chunks_removed(postgres, synced):
    name, path, _, server, runtime = synced
    execute(postgres, f"DELETE FROM {runtime.pgvector.table} WHERE row_id IN ('3', '17', '29')")
    # A chunk of a row the ledger does not hold (copied in by hand, a bad restore).
    execute(
        postgres,
        f"INSERT INTO {runtime.pgvector.table} (point_id, row_id, chunk_index, shard, "
        "chunk_text, chunk_hash, token_count, model, embedding) SELECT gen_random_uuid(), "
        "'stray', 0, shard, chunk_text, chunk_hash, token_count, model, embedding "
        f"FROM {runtime.pgvector.table} WHERE row_id = '5'",
    )
    result = cli(path, "sync", "--source", name)
    assert result.exit_code == 0, result.output
    assert "rows to restore" in result.output and "1 stray chunks removed" in result.output
    assert_complete(postgres, runtime)


def test_both_sinks_lost_are_rebuilt_by_sync(postgres, synced):
    name, path, _, server, runtime = synced
    execute(postgres, f"TRUNCATE {runtime.pgvector.table}")
    shutil.rmtree(qdrant_path() / runtime.qdrant.collection)
    assert status(path, name)["embedded_rows"] == 0
    requests = len(server.requests)
    result = cli(path, "sync", "--source", name)
    assert result.exit_code == 0, result.output
    assert len(server.requests) > requests  # nothing left to copy from: embedded again
    assert_complete(postgres, runtime)
    assert status(path, name)["embedded_rows"] == ROWS


def test_removed_qdrant_store_is_resent_from_pgvector(postgres, synced):
    name, path, _, server, runtime = synced
    shutil.rmtree(qdrant_path() / runtime.qdrant.collection)
    requests = len(server.requests)
    result = cli(path, "sync", "--source", name)
    assert result.exit_code == 0, result.output
    assert len(server.requests) == requests
    assert_complete(postgres, runtime)


def test_the_sensor_turns_a_lost_sink_into_runs(postgres, synced):
    name, path, settings, server, runtime = synced
    execute(postgres, f"TRUNCATE {runtime.pgvector.table}")
    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def(f"{name}_changes")
    with (
        dg.DagsterInstance.ephemeral() as instance,
        dg.build_sensor_context(
            instance=instance, resources=defs.resources, definitions=defs
        ) as context,
    ):
        result = sensor.evaluate_tick(context)
    (request,) = result.run_requests  # one run for every shard
    assert request.tags["embedding_assets/shards"].split(",") == settings.source(name).shard_keys
    assert result.cursor  # when it last compared the sinks with the ledger
