"""Odd source shapes: an id that turns up twice after it was stored (each capture mode),
NULL ids, and configuration that must be refused before anything is written."""

import json

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedding_assets.cli.main import main
from embedding_assets.config.settings import SettingsError, load_settings
from embedding_assets.state.db import engine_for
from embedding_assets.state.diff import SourceColumnsError
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration


def stored_texts(url: str, runtime) -> dict[str, str]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(sa.text(f"SELECT row_id, chunk_text FROM {runtime.pgvector.table}"))
        return {r.row_id: r.chunk_text for r in rows}


def status(path) -> dict:
    result = CliRunner().invoke(main, ["--sources", str(path), "status", "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)[0]


@pytest.mark.parametrize("capture", ["trigger", "watermark", "diff"])
def test_an_id_duplicated_after_it_was_stored_is_reported_and_never_flips(
    postgres, home, tmp_path, capture
):
    name = unique_name()
    with engine_for(postgres).begin() as conn:
        # No primary key: nothing in the table stops a second row with the same id.
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id int, title text, body text, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            )
        )
        conn.execute(sa.text(f"CREATE INDEX ON {name} (id)"))
        conn.execute(
            sa.text(f"INSERT INTO {name} (id, title, body) VALUES (1, 'one', 'a'), (2, 'two', 'b')")
        )
    source = {"shards": "1", "change_capture": capture}
    if capture == "watermark":
        source["watermark_column"] = "updated_at"
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(tmp_path, name, server.base_url, {}, source)
        settings = load_settings(path)
        runtime = runtime_for(settings, name, postgres)
        with dg.DagsterInstance.ephemeral() as instance:
            assert sync_shards(settings, name, instance)["00"].success
            assert stored_texts(postgres, runtime) == {"1": "one: a", "2": "two: b"}
            with engine_for(postgres).begin() as conn:
                conn.execute(
                    sa.text(
                        f"INSERT INTO {name} (id, title, body) VALUES (2, 'TWO', 'late'), "
                        "(3, 'three', 'c'), (4, 'four', 'x'), (4, 'FOUR', 'y')"
                    )
                )
            assert runtime.work()[0].has_work
            assert sync_shards(settings, name, instance)["00"].success
            # The id keeps what it had; the new clean row is stored; both ids reported.
            assert stored_texts(postgres, runtime) == {
                "1": "one: a",
                "2": "two: b",
                "3": "three: c",
            }
            errors = {e.row_id: e for e in runtime.errors.list()}
            assert set(errors) == {"2", "4"}
            assert all(e.kind == "duplicate_id" and e.state == "dead" for e in errors.values())
            assert "2 rows of source" in errors["2"].message
            # Reported once: no work left, so the sensor starts nothing more (no flip-flop).
            assert not runtime.work()[0].has_work
            for _ in range(2):
                assert sync_shards(settings, name, instance)["00"].success
                assert stored_texts(postgres, runtime)["2"] == "two: b"
            report = status(path)
            assert report["duplicate_ids"] == ["2", "4"] and report["dead_rows"] == 2
            # Resolved: the remaining row is written and the error cleared.
            with engine_for(postgres).begin() as conn:
                conn.execute(sa.text(f"DELETE FROM {name} WHERE id = 2 AND title = 'two'"))
                conn.execute(sa.text(f"DELETE FROM {name} WHERE id = 4 AND title = 'four'"))
            if capture == "watermark":
                runtime.feed.reconcile()  # a watermark feed sees deletes by reconciliation
            assert sync_shards(settings, name, instance)["00"].success
            assert stored_texts(postgres, runtime) == {
                "1": "one: a",
                "2": "TWO: late",
                "3": "three: c",
                "4": "FOUR: y",
            }
            assert runtime.errors.list() == []
            assert status(path)["duplicate_ids"] == []


def test_null_ids_are_counted_and_reported(postgres, home, tmp_path):
    name = unique_name()
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (id int, title text, body text)"))
        conn.execute(
            sa.text(
                f"INSERT INTO {name} VALUES (1, 'one', 'a'), (NULL, 'lost', 'b'), "
                "(NULL, 'lost too', 'c')"
            )
        )
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(tmp_path, name, server.base_url, {}, {"shards": "1"})
        result = CliRunner().invoke(main, ["--sources", str(path), "sync"])
        assert result.exit_code == 0, result.output
        report = status(path)
        assert report["null_id_rows"] == 2 and report["embedded_rows"] == 1
        text = CliRunner().invoke(main, ["--sources", str(path), "status"]).output
        assert "2 eligible rows have a NULL `id` and are never embedded" in text


def write(tmp_path, body: str):
    path = tmp_path / "sources.yaml"
    path.write_text(
        "embedders:\n  local: {provider: sentence_transformers}\nsources:\n"
        + "".join(f"  {line.strip()}\n" for line in body.strip().splitlines())
    )
    return load_settings(path)


def test_configuration_is_refused_before_anything_is_written(postgres, home, tmp_path):
    with pytest.raises(SettingsError, match="write the same Qdrant collection 'shared'"):
        write(
            tmp_path,
            """
  - {name: a, table: a, text: "{t}", qdrant: {collection: shared}}
  - {name: b, table: b, text: "{t}", qdrant: {collection: shared}}""",
        )
    with pytest.raises(SettingsError, match="write the same Qdrant collection 'a'"):
        write(
            tmp_path,
            """
  - {name: a, table: a, text: "{t}"}
  - {name: b, table: b, text: "{t}", qdrant: {collection: a}}""",
        )
    for bad in ("../escape", "a/b", "", "x" * 256):
        with pytest.raises(SettingsError, match="not a valid Qdrant collection name"):
            write(
                tmp_path,
                f'  - {{name: a, table: a, text: "{{t}}", qdrant: {{collection: "{bad}"}}}}',
            )
    with pytest.raises(SettingsError, match="alias it in a `query:`"):
        write(tmp_path, '  - {name: a, table: a, text: "{price:.2f}"}')

    # A column with a space works in a template; a missing one is named, with the fix,
    # before any table is created.
    name = unique_name()
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f'CREATE TABLE {name} (id int PRIMARY KEY, "Full Title" text)'))
        conn.execute(sa.text(f"INSERT INTO {name} VALUES (1, 'spaced')"))
    settings = write(
        tmp_path, f'  - {{name: {name}, table: {name}, text: "{{Full Title}}", shards: 1}}'
    )
    with dg.DagsterInstance.ephemeral() as instance:
        assert sync_shards(settings, name, instance)["00"].success
    runtime = runtime_for(settings, name, postgres)
    assert stored_texts(postgres, runtime) == {"1": "spaced"}

    other = unique_name()
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {other} (id int PRIMARY KEY, title text)"))
    settings = write(
        tmp_path,
        f'  - {{name: {other}, table: {other}, text: "{{titel}}", metadata: [tags], shards: 1}}',
    )
    runtime = runtime_for(settings, other, postgres)
    with pytest.raises(SourceColumnsError) as raised:
        runtime.feed.pending(0, 10)
    message = str(raised.value)
    assert "text names 'titel'" in message and "metadata names 'tags'" in message
    assert "['id', 'title']" in message and "query:" in message
    assert not runtime.pgvector.table_exists()
