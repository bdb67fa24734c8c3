"""Edits of sources.yaml take effect at the next sync, each as its class in config.effects says:
real Postgres + pgvector, Qdrant's embedded engine, an OpenAI-compatible server on 127.0.0.1
that counts what it embeds, trigger capture."""

from pathlib import Path

import sqlalchemy as sa

from embedding_assets.cli.plan import plan_report
from embedding_assets.cli.status import status_report
from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import load_settings
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    unique_name,
)

ROWS = 200


def embedded_inputs(server: ProviderServer) -> int:
    return sum(len(r.inputs) for r in server.requests if r.status == 200)


class Source:
    """A 200-row table, kind 'even' / 'odd' half each, and its sources.yaml."""

    def __init__(self, postgres: str, tmp_path: Path, fake: ProviderServer):
        self.url, self.tmp_path, self.fake = postgres, tmp_path, fake
        self.name = unique_name()
        rows = [
            {
                "id": i,
                "title": f"Doc {i}",
                "body": f"body {i}",
                "category": ("even", "odd")[i % 2],
            }
            for i in range(1, ROWS + 1)
        ]
        create_docs_table(postgres, self.name, rows)

    def configure(self, **source: str):
        path = fake_embedder_settings(
            self.tmp_path, self.name, self.fake.base_url, {}, {"shards": "2", **source}
        )
        return load_settings(path)

    def sync(self, settings, instance) -> int:
        """One `embedding-assets sync` (shards with work only); returns the inputs embedded."""
        before = embedded_inputs(self.fake)
        reports = sync_source(settings, self.name, None, instance, every_shard=False)
        assert all(r.success for r in reports), [r.error for r in reports]
        return embedded_inputs(self.fake) - before

    def stored_ids(self) -> set[int]:
        with engine_for(self.url).connect() as conn:
            rows = conn.scalars(sa.text(f"SELECT DISTINCT row_id FROM {self.name}_embeddings"))
            return {int(r) for r in rows}

    def qdrant_payloads(self) -> list[dict]:
        """The payloads of the points of every chunk pgvector holds."""
        with engine_for(self.url).connect() as conn:
            ids = list(conn.scalars(sa.text(f"SELECT point_id FROM {self.name}_embeddings")))
        return [h.payload for h in qdrant_store_from_env().retrieve(self.name, ids)]


def ids_of(kind: str) -> set[int]:
    return {i for i in range(1, ROWS + 1) if (i % 2 == 0) == (kind == "even")}


def test_a_where_edit_moves_the_store_to_the_new_rows_at_the_next_sync(
    postgres, home, tmp_path, instance, fake
):
    source = Source(postgres, tmp_path, fake)
    even = source.configure(where="\"category = 'even'\"")
    assert source.sync(even, instance) == 100
    assert source.stored_ids() == ids_of("even")

    odd = source.configure(where="\"category = 'odd'\"")
    report = status_report(odd, source.name)
    assert report["config_changes"] == {"where": "eligibility"}
    plan = plan_report(odd, source.name)
    assert plan["config_changes"] == {"where": "eligibility"}
    assert (plan["rows_to_delete"], plan["rows"], plan["chunks_to_embed"]) == (100, 100, 100)
    calls = source.sync(odd, instance)
    assert calls == 100  # the entering rows' chunks only
    assert source.stored_ids() == ids_of("odd")
    assert qdrant_store_from_env().count(source.name) == 100
    after = status_report(odd, source.name, exact=True)
    assert after["config_changes"] == {}
    assert (after["eligible_rows"], after["embedded_rows"], after["pending_rows"]) == (100, 100, 0)
    assert source.sync(odd, instance) == 0  # applied once

    # The edit widened: the even rows come back. Their vectors were kept when they left.
    both = source.configure(where="\"category IN ('even', 'odd')\"")
    assert source.sync(both, instance) == 0
    assert source.stored_ids() == ids_of("even") | ids_of("odd")
    assert qdrant_store_from_env().count(source.name) == ROWS


def test_in_place_and_operational_edits_embed_nothing(postgres, home, tmp_path, instance, fake):
    source = Source(postgres, tmp_path, fake)
    first = source.configure(metadata="[views]")
    assert source.sync(first, instance) == ROWS

    more = source.configure(metadata="[views, category]")
    assert status_report(more, source.name)["config_changes"] == {"metadata": "in_place"}
    assert source.sync(more, instance) == 0
    with engine_for(postgres).connect() as conn:
        kinds = dict(
            conn.execute(
                sa.text(f"SELECT row_id, category FROM {source.name}_embeddings")
            ).fetchall()
        )
    assert len(kinds) == ROWS and kinds["2"] == "even" and kinds["3"] == "odd"
    payloads = source.qdrant_payloads()
    assert len(payloads) == ROWS and {p["category"] for p in payloads} == {"even", "odd"}

    with engine_for(postgres).connect() as conn:
        written = sa.text(
            "SELECT max(pg_synced_at) FROM embedding_assets.row_state WHERE target = :t"
        )
        before = conn.scalar(written, {"t": f"public.{source.name}_embeddings"})
    ops = source.configure(metadata="[views, category]", max_rows_per_run="50",
                           sensor_interval_seconds="9", retries="{max_attempts: 2}")  # fmt: skip
    assert status_report(ops, source.name)["config_changes"] == {}
    assert source.sync(ops, instance) == 0
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(written, {"t": f"public.{source.name}_embeddings"}) == before


def database_snapshot(url: str, table: str) -> dict:
    """What a read-only command must not change: triggers on the table, our functions and
    relations, the registry, the queue."""
    with engine_for(url).connect() as conn:
        one = conn.scalar
        return {
            "triggers": sorted(
                conn.scalars(
                    sa.text("SELECT tgname FROM pg_trigger WHERE tgrelid = to_regclass(:t)"),
                    {"t": table},
                )
            ),
            "relations": one(sa.text("SELECT count(*) FROM pg_class")),
            "functions": one(sa.text("SELECT count(*) FROM pg_proc")),
            "generations": one(sa.text("SELECT count(*) FROM embedding_assets.generations")),
            "queue": one(sa.text("SELECT count(*) FROM embedding_assets.change_queue")),
            "capture": one(sa.text("SELECT count(*) FROM embedding_assets.capture")),
        }


def test_status_of_a_renamed_source_writes_nothing_and_leftovers_are_pruned_on_request(
    postgres, home, tmp_path, instance, fake
):
    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    source = Source(postgres, tmp_path, fake)
    settings = source.configure()
    assert source.sync(settings, instance) == ROWS
    renamed_path = tmp_path / "renamed.yaml"
    renamed_path.write_text(
        settings.path.read_text().replace(f"- name: {source.name}", f"- name: {source.name}x")
    )
    before = database_snapshot(postgres, source.name)
    result = CliRunner().invoke(main, ["--sources", str(renamed_path), "status", "--json"])
    assert result.exit_code == 0, result.output
    assert "never synced" in result.output
    assert database_snapshot(postgres, source.name) == before  # nothing installed, queued

    # The renamed source synced on purpose, then the name goes back: its triggers are
    # reported (they queue every write for a target nothing reads) and pruned on request.
    renamed = load_settings(renamed_path)
    assert sync_source(renamed, f"{source.name}x", None, instance, every_shard=False)
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"UPDATE {source.name} SET body = body || '!' WHERE id <= 10"))
    result = CliRunner().invoke(main, ["--sources", str(settings.path), "status"])
    assert result.exit_code == 0, result.output
    assert f"source '{source.name}x' is not in sources.yaml" in result.output
    assert "4 capture triggers" in result.output and "10 queued changes" in result.output
    pruned = CliRunner().invoke(
        main, ["--sources", str(settings.path), "prune", "--source", f"{source.name}x"]
    )
    assert pruned.exit_code == 0, pruned.output
    assert "removed 4 capture triggers, 10 queued changes" in pruned.output
    refused = CliRunner().invoke(
        main, ["--sources", str(settings.path), "prune", "--source", source.name]
    )
    assert refused.exit_code != 0 and "is in sources.yaml" in refused.output
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"UPDATE {source.name} SET body = body || '!' WHERE id <= 10"))
    result = CliRunner().invoke(main, ["--sources", str(settings.path), "status"])
    assert f"source '{source.name}x'" not in result.output
    assert source.sync(settings, instance) == 10  # the configured source saw both updates


def test_a_reembed_edit_is_reported_by_status_and_built_only_by_a_sync(
    postgres, home, tmp_path, instance, fake
):
    from embedding_assets.cli.generations import generations_report

    source = Source(postgres, tmp_path, fake)
    first = source.configure()
    assert source.sync(first, instance) == ROWS
    rechunked = source.configure(chunking="{max_tokens: 32, overlap: 4}")
    before = database_snapshot(postgres, source.name)
    report = status_report(rechunked, source.name)
    assert report["config_changes"] == {"pipeline": "reembed"}
    assert [g["state"] for g in generations_report(rechunked, source.name)] == ["live"]
    assert database_snapshot(postgres, source.name) == before  # nothing registered
    source.sync(rechunked, instance)  # builds generation 2 and promotes it
    assert [g["state"] for g in generations_report(rechunked, source.name)] == [
        "previous",
        "live",
    ]
    assert status_report(rechunked, source.name)["config_changes"] == {}


def test_a_run_uses_the_configuration_it_started_with_even_if_the_file_breaks(
    postgres, home, tmp_path, instance, fake
):
    """Every step, IO managers included, reads the settings the definitions were built
    from: a file broken (or edited) mid-run changes nothing in the run, and the sensor of
    those definitions asks for nothing until the code location has a valid file again."""
    from embedding_assets.config.settings import drift
    from embedding_assets.definitions import build_definitions

    source = Source(postgres, tmp_path, fake)
    settings = source.configure()
    job = build_definitions(settings).resolve_job_def(f"{source.name}_sync")
    settings.path.write_text(settings.path.read_text() + "    bogus_key: 1\n")
    problem = drift(settings)
    assert problem is not None and "bogus_key" in problem and "Nothing is asked for" in problem
    for key in settings.source(source.name).shard_keys:
        assert job.execute_in_process(partition_key=key, instance=instance).success
    assert source.stored_ids() == set(range(1, ROWS + 1))
    settings.path.write_text(settings.path.read_text().replace("    bogus_key: 1\n", ""))
    assert drift(settings) is None


def test_a_shards_edit_reshards_without_embedding(postgres, home, tmp_path, instance, fake):
    source = Source(postgres, tmp_path, fake)
    two = source.configure()
    assert source.sync(two, instance) == ROWS
    three = source.configure(shards="3")
    assert source.sync(three, instance) == 0
    report = status_report(three, source.name, exact=True)
    assert set(report["shards"]) == {"0", "1", "2"} or len(report["shards"]) == 3
    assert (report["eligible_rows"], report["embedded_rows"], report["pending_rows"]) == (
        ROWS,
        ROWS,
        0,
    )
    assert report["pgvector_chunks"] == report["qdrant_points"] == ROWS
    per_shard = [s["qdrant_points"] for s in report["shards"].values()]
    assert per_shard == [s["pgvector_chunks"] for s in report["shards"].values()]
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"UPDATE {source.name} SET body = 'moved' WHERE id = 7"))
    assert source.sync(three, instance) == 1


def hnsw_definition(url: str, table: str) -> str | None:
    with engine_for(url).connect() as conn:
        return conn.scalar(
            sa.text(
                "SELECT indexdef FROM pg_indexes WHERE tablename = :t AND indexdef LIKE '%hnsw%'"
            ),
            {"t": table},
        )


def test_index_edits_are_applied_in_place(postgres, home, tmp_path, instance, fake, monkeypatch):
    """pgvector's HNSW m / ef_construction: the index is rebuilt; a Qdrant server's HNSW and
    quantization: the collection's config is updated. 0 embedder calls. No Qdrant server
    runs here and qdrant-client's in-process mode keeps no index config, so the update is
    checked at the client call (recorded, then passed through): the only stand-in."""
    monkeypatch.setenv("QDRANT_URL", ":memory:")
    source = Source(postgres, tmp_path, fake)
    first = source.configure()
    assert source.sync(first, instance) == ROWS
    table = f"{source.name}_embeddings__g1"
    assert "m='16'" in hnsw_definition(postgres, table)
    edited = source.configure(
        pgvector="{hnsw: {m: 8, ef_construction: 32}}",
        qdrant="{hnsw: {m: 8, ef_construct: 50}, quantization: scalar}",
    )
    assert status_report(edited, source.name)["config_changes"] == {
        "pgvector.hnsw.m": "in_place",
        "pgvector.hnsw.ef_construction": "in_place",
        "qdrant.hnsw.m": "in_place",
        "qdrant.hnsw.ef_construct": "in_place",
        "qdrant.quantization": "in_place",
    }
    client = qdrant_store_from_env()._client
    updates = []
    passed_through = client.update_collection
    monkeypatch.setattr(
        client,
        "update_collection",
        lambda name, **kw: updates.append((name, kw)) or passed_through(name, **kw),
    )
    assert source.sync(edited, instance) == 0
    definition = hnsw_definition(postgres, table)
    assert "m='8'" in definition and "ef_construction='32'" in definition
    [(name, change)] = updates
    assert name == f"{source.name}__g1"
    assert (change["hnsw_config"].m, change["hnsw_config"].ef_construct) == (8, 50)
    assert change["quantization_config"].scalar.type == "int8"


def test_a_write_back_column_added_later_is_filled_by_the_next_sync(
    postgres, home, tmp_path, instance, fake
):
    source = Source(postgres, tmp_path, fake)
    assert source.sync(source.configure(), instance) == ROWS
    with_column = source.configure(write_back="{column: vec, embedded_at_column: vec_at}")
    changes = status_report(with_column, source.name)["config_changes"]
    assert changes["write_back.column"] == "in_place"
    assert source.sync(with_column, instance) == 0
    with engine_for(postgres).connect() as conn:
        filled = sa.text(f"SELECT count(*) FROM {source.name} WHERE vec IS NOT NULL")
        assert conn.scalar(filled) == ROWS
    first_chunk = source.configure(
        write_back="{column: vec, embedded_at_column: vec_at, row_vector: first_chunk}"
    )
    assert source.sync(first_chunk, instance) == 0
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(filled) == ROWS
    assert status_report(first_chunk, source.name)["config_changes"] == {}
