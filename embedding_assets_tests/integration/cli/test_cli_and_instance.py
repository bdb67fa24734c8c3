"""The CLI against the test database, recording runs in a Postgres-backed Dagster instance
built from the project's dagster.yaml."""

import json

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedding_assets.cli.main import main
from embedding_assets.state.db import PgvectorMissingError, engine_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    create_login_role,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def source(postgres, home, tmp_path, monkeypatch):
    monkeypatch.delenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", raising=False)
    name = unique_name()
    rows = [{"id": i, "title": f"Tool {i}", "body": f"does thing {i}"} for i in range(1, 16)]
    create_docs_table(postgres, name, rows)
    settings = write_settings(tmp_path, name, name, shards="3")
    return name, str(settings.path)


def run_cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_sync_status_search_through_the_cli(source, home):
    name, path = source
    before = json.loads(run_cli("--sources", path, "status", "--json").output)[0]
    assert before["eligible_rows"] == 15 and before["pending_rows"] == 15
    assert before["embedded_rows"] == 0 and before["qdrant_points"] == 0

    synced = run_cli("--sources", path, "sync", "--json")
    assert synced.exit_code == 0, synced.output
    reports = json.loads(synced.output.strip().splitlines()[-1])
    assert [r["shard"] for r in reports] == ["00", "01", "02"]
    assert sum(r["rows"] for r in reports) == 15
    assert sum(r["embedded_chunks"] for r in reports) == 15
    assert all(r["success"] for r in reports)

    after = json.loads(run_cli("--sources", path, "status", "--json").output)[0]
    for field in ("eligible_rows", "embedded_rows", "pgvector_chunks", "qdrant_points"):
        assert after[field] == 15, field
    assert after["pending_rows"] == 0
    assert set(after["shards"]) == {"00", "01", "02"}
    assert sum(s["qdrant_points"] for s in after["shards"].values()) == 15

    for backend in ("pgvector", "qdrant"):
        out = run_cli("--sources", path, "search", "Tool 7: does thing 7", "-k", "3",
                      "--backend", backend, "--json")  # fmt: skip
        hits = json.loads(out.output)
        assert hits[0]["row_id"] == "7"
        assert set(hits[0]) >= {"row_id", "score", "text"}

    one = run_cli("--sources", path, "sync", "--shard", "01")
    assert one.exit_code == 0 and "0 rows" in one.output
    # Nothing changed: the change feed says so, and sync starts no run at all.
    idle = run_cli("--sources", path, "sync", "--json")
    assert json.loads(idle.output.strip().splitlines()[-1]) == []

    assert after["change_capture"] == "trigger" and after["exact"] is False
    exact = json.loads(run_cli("--sources", path, "status", "--exact", "--json").output)[0]
    assert exact["exact"] is True
    assert (exact["eligible_rows"], exact["embedded_rows"], exact["pending_rows"]) == (15, 15, 0)
    assert exact["eligible_rows_counted"] == 15 and exact["counted_at"]
    reconciled = json.loads(run_cli("--sources", path, "reconcile", "--json").output)
    assert [(r["source"], r["rows_queued"]) for r in reconciled] == [(name, 0)]
    sql = run_cli("--sources", path, "triggers", "sql", "--source", name).output
    assert "SECURITY DEFINER" in sql and sql.count("CREATE TRIGGER") == 4

    # The runs are recorded in the instance the UI uses: Postgres storage, not SQLite.
    instance = dg.DagsterInstance.from_config(str(home / "dagster"))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        # One run for the three shards of the first sync, one for `--shard 01`.
        assert instance.get_runs_count(dg.RunsFilter(job_name=f"{name}_sync_shards")) == 2
    finally:
        instance.dispose()


def test_cli_errors_name_the_problem(source, tmp_path):
    name, path = source
    bad_shard = run_cli("--sources", path, "sync", "--shard", "09")
    assert bad_shard.exit_code != 0 and "has shards" in bad_shard.output
    bad_source = run_cli("--sources", path, "status", "--source", "nope")
    assert bad_source.exit_code != 0 and "no source named 'nope'" in bad_source.output
    broken = tmp_path / "broken.yaml"
    broken.write_text("sources:\n  - name: x\n    table: t\n    text: '{a}'\n    typo: 1\n")
    invalid = run_cli("--sources", str(broken), "status")
    assert invalid.exit_code != 0 and "typo" in invalid.output and str(broken) in invalid.output


def test_database_without_pgvector_gets_a_clear_error(postgres):
    admin = engine_for(postgres)
    db = unique_name("nopgv")
    with admin.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.execute(sa.text(f"CREATE DATABASE {db}"))
        conn.execute(sa.text(f"DROP ROLE IF EXISTS {db}"))
        conn.execute(sa.text(create_login_role(postgres, db)))
        conn.execute(sa.text(f"ALTER DATABASE {db} OWNER TO {db}"))
    url = sa.make_url(postgres).set(username=db, database=db).render_as_string(False)
    with pytest.raises(PgvectorMissingError, match="no pgvector extension.*DATABASE_URL"):
        engine_for(url)


def test_status_search_and_sync_errors_are_one_line_with_the_fix(
    postgres, home, tmp_path, monkeypatch
):
    from embedding_assets_tests.fakes.provider_server import free_port

    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    bad_column = write_settings(tmp_path, name, name, metadata="[category, no_such_column]")
    cases = {
        "a bad column": (bad_column.path, "no_such_column", "source does not have"),
        "a missing table": (
            write_settings(tmp_path, unique_name(), "no_such_table").path,
            "no_such_table",
            "table:",
        ),
    }
    for what, (path, named, fix) in cases.items():
        result = run_cli("--sources", str(path), "status")
        assert result.exit_code == 1, (what, result.output)
        assert "Traceback" not in result.output and "[SQL:" not in result.output
        assert named in result.output and fix in result.output, (what, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
        # Nothing was ever stored: search says so, and what to run (or what is missing).
        searched = run_cli("--sources", str(path), "search", "anything")
        assert searched.exit_code == 1 and len(searched.output.strip().splitlines()) == 1
        assert "run `embedding-assets sync` first" in searched.output or named in searched.output
    synced = run_cli("--sources", str(bad_column.path), "sync")
    assert synced.exit_code == 1
    assert "no_such_column" in synced.output and "[SQL:" not in synced.output
    # A refused connection: the cause and where to look.
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    refused = run_cli("--sources", str(bad_column.path), "status")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "DATABASE_URL" in refused.output and len(refused.output.strip().splitlines()) == 1
    debug = CliRunner().invoke(main, ["--debug", "--sources", str(bad_column.path), "status"])
    assert debug.exception is not None  # --debug lets the exception (and traceback) through
