"""A store written by the version at commit 0f72d97 (the last one before the layout of issue 21
and the schema migrations) keeps working after an upgrade, with nothing embedded again.

The old version's own code (from this repository's history) syncs a table into pgvector and
Qdrant's embedded engine in a database of its own; the current code then syncs and reports
status over the same store. Real Postgres + pgvector, the embedded Qdrant engine, and an
OpenAI-compatible server on 127.0.0.1 that counts what it embeds.
"""

import json
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from embedding_assets.state.db import engine_for
from embedding_assets.state.migrations import LATEST
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    dagster_database,
    fake_embedder_settings,
    unique_name,
)

OLD_COMMIT = "0f72d97"
REPO = Path(__file__).resolve().parents[3]


def old_package(into: Path) -> Path:
    """The `embedding_assets` package as it was at OLD_COMMIT, unpacked under `into`."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", OLD_COMMIT, "embedding_assets", "dagster.yaml"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(
            f"commit {OLD_COMMIT} is not in this clone ({archive.stderr.decode().strip()}); "
            "the upgrade test needs the repository's history (git fetch --unshallow)"
        )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return into


def own_database(url: str) -> str:
    database = unique_name("upgrade")
    with engine_for(url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text(f"CREATE DATABASE {database}")
        )
    own = make_url(url).set(database=database).render_as_string(hide_password=False)
    with engine_for(own).begin() as conn:
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
    return own


def cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "embedding_assets.cli", *args],
        env=env,
        cwd=cwd,  # not the repository: `-m` puts the working directory first on sys.path
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_a_store_of_0f72d97_upgrades_with_nothing_embedded_again(postgres, home, tmp_path):
    old = old_package(tmp_path / "old")
    url = own_database(postgres)
    name = unique_name()
    rows = [{"id": i, "title": f"Doc {i}", "body": f"body {i}"} for i in range(1, 31)]
    create_docs_table(url, name, rows)
    with ProviderServer("openai", dim=8) as fake:
        sources = fake_embedder_settings(tmp_path, name, fake.base_url, {}, {"shards": "2"})
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "EMBEDDING_ASSETS_HOME": str(home),
            "EMBEDDING_ASSETS_DAGSTER_PG_URL": dagster_database(postgres),
            "HF_HUB_OFFLINE": "1",
        }
        cli(["--sources", str(sources), "sync"], {**env, "PYTHONPATH": str(old)}, tmp_path)
        assert sum(len(r.inputs) for r in fake.requests) == 30
        with engine_for(url).connect() as conn:
            assert (
                conn.scalar(sa.text("SELECT to_regclass('embedding_assets.schema_version')"))
                is None
            )
        # Some changes while the old version was installed, then the upgrade.
        with engine_for(url).begin() as conn:
            conn.execute(sa.text(f"UPDATE {name} SET body = 'changed' WHERE id = 3"))

        new_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        cli(["--sources", str(sources), "sync"], new_env, tmp_path)
        assert sum(len(r.inputs) for r in fake.requests) == 31  # the changed row only
        report = json.loads(
            cli(
                ["--sources", str(sources), "status", "--json", "--exact"], new_env, tmp_path
            ).stdout
        )[0]
        assert (report["eligible_rows"], report["embedded_rows"], report["pending_rows"]) == (
            30,
            30,
            0,
        )
        assert report["pgvector_chunks"] == report["qdrant_points"] == 30
        assert report["config_changes"] == {}
        # Its Qdrant collection has no sparse `lexical` vector (a collection cannot gain one):
        # generation 2 was built beside it from the stored vectors, nothing embedded, and is
        # live.
        assert [g["state"] for g in report["generations"]] == ["previous", "live"]
        cli(["--sources", str(sources), "sync"], new_env, tmp_path)
        assert sum(len(r.inputs) for r in fake.requests) == 31
    with engine_for(url).connect() as conn:
        versions = list(
            conn.scalars(sa.text("SELECT version FROM embedding_assets.schema_version ORDER BY 1"))
        )
    assert versions == list(range(1, LATEST + 1))


def test_migrations_are_applied_once_and_a_newer_schema_is_refused(postgres):
    from embedding_assets.state import migrations

    url = own_database(postgres)
    engine = engine_for(url)
    assert migrations.migrate(engine) == list(range(1, LATEST + 1))
    migrations._MIGRATED.clear()  # as another process would find it
    assert migrations.migrate(engine) == []
    with engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO embedding_assets.schema_version (version, name) VALUES (999, 'x')")
        )
    migrations._MIGRATED.clear()
    with pytest.raises(migrations.SchemaVersionError, match="newer embedding-assets"):
        migrations.migrate(engine)
