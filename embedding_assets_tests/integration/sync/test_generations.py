"""Blue/green generations against real parts: embedded PostgreSQL + pgvector, Qdrant (the
qdrant-client server code path in memory, with real aliases, and Qdrant's embedded engine),
the real local model, and an OpenAI-compatible test server on 127.0.0.1 with another
dimension (8) as the second model."""

import subprocess
import textwrap
import threading
import time
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.cli.generations import generations_report
from embedding_assets.cli.plan import plan_report
from embedding_assets.cli.search import search_source
from embedding_assets.cli.status import status_report
from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import Settings, load_settings
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.state.generations import Generations
from embedding_assets.state.migrations import migrate
from embedding_assets.sync.generations import runtime_for
from embedding_assets.sync.promotion import converge_readers
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import create_docs_table, unique_name
from embedding_assets_tests.integration.sync.test_crash_every_stage import (
    dagster_url,  # noqa: F401 (a fixture)
    kill,
    run_sync,
)

LOCAL = "sentence_transformers:all-MiniLM-L6-v2"
FAKE = "openai:fake-embedding"


def docs(n: int, start: int = 1, words: int = 6) -> list[dict]:
    filler = " ".join(f"word{j}" for j in range(words))
    return [
        {"id": i, "title": f"Doc {i}", "body": f"about topic {i} {filler}", "category": "a"}
        for i in range(start, start + n)
    ]


def settings_for(
    tmp_path: Path,
    name: str,
    tag: str,
    embedder: str = "local",
    fake_url: str = "http://127.0.0.1:9",
    text: str = "{title}: {body}",
    chunking: str = "{max_tokens: 64, overlap: 8}",
    metadata: str = "[category]",
    generations: str = "{}",
    budget: str = "",
    write_back: str = "null",
) -> Settings:
    path = tmp_path / f"{name}-{tag}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            embedders:
              local:
                provider: sentence_transformers
                model: all-MiniLM-L6-v2
                {budget}
              fake:
                provider: openai
                model: fake-embedding
                base_urls: ["{fake_url}"]
                dimension: 8
                max_attempts: 1
                price_per_million_tokens: 0.02
            sources:
              - name: {name}
                table: {name}
                text: "{text}"
                metadata: {metadata}
                embedder: {embedder}
                shards: 2
                chunking: {chunking}
                generations: {generations}
                write_back: {write_back}
            """
        )
    )
    return load_settings(path)


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


@pytest.fixture
def server_qdrant(home, monkeypatch):
    """qdrant-client's server code path in this process: real collections and aliases."""
    monkeypatch.setenv("QDRANT_URL", ":memory:")
    return qdrant_store_from_env()


def sync_ok(settings: Settings, name: str, instance, shard: str | None = None) -> list:
    reports = sync_source(settings, name, shard, instance)
    assert all(r.success for r in reports), [r.error for r in reports]
    return reports


def view_models(url: str, name: str) -> list[str]:
    with engine_for(url).connect() as conn:
        return list(conn.scalars(sa.text(f"SELECT DISTINCT model FROM public.{name}_embeddings")))


def view_rows(url: str, name: str) -> dict[str, set[str]]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(sa.text(f"SELECT row_id, chunk_text FROM public.{name}_embeddings"))
        found: dict[str, set[str]] = {}
        for row_id, text in rows:
            found.setdefault(row_id, set()).add(text)
    return found


def states(url: str, name: str) -> dict[int, str]:
    return {g.number: g.state for g in Generations(engine_for(url), name).all()}


def execute(url: str, *statements: str) -> None:
    with engine_for(url).begin() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))


def test_model_change_builds_beside_live_and_readers_never_see_a_mix(
    postgres, server_qdrant, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs(24))
    local = settings_for(tmp_path, name, "local")
    sync_ok(local, name, instance)
    assert states(postgres, name) == {1: "live"}
    assert view_models(postgres, name) == [LOCAL]
    assert server_qdrant.alias_target(name) == f"{name}__g1"

    # Readers poll the stable names the whole time: the view and the Qdrant alias.
    seen: list[tuple[tuple[str, ...], int]] = []
    stop = threading.Event()
    client = server_qdrant._client

    def read() -> None:
        while not stop.is_set():
            models = tuple(sorted(view_models(postgres, name)))
            size = client.get_collection(name).config.params.vectors.size
            seen.append((models, size))
            time.sleep(0.01)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with ProviderServer("openai", dim=8) as fake:
        remote = settings_for(tmp_path, name, "fake", embedder="fake", fake_url=fake.base_url)
        plan = plan_report(remote, name)
        assert plan["generation"] == "2 (not created yet)"
        assert (plan["rows"], plan["chunks_to_embed"]) == (24, 24)
        assert plan["estimated_cost"] == pytest.approx(plan["tokens_to_embed"] / 1e6 * 0.02)
        # Half the build, then rows change while it is under way.
        sync_ok(remote, name, instance, shard="00")
        assert states(postgres, name) == {1: "live", 2: "building"}
        assert view_models(postgres, name) == [LOCAL]
        execute(
            postgres,
            f"UPDATE {name} SET title = 'Renamed 5' WHERE id = 5",
            f"DELETE FROM {name} WHERE id = 7",
            f"INSERT INTO {name} (id, title, body, category) VALUES (100, 'Doc 100', 'new', 'a')",
        )
        reports = sync_ok(remote, name, instance)
        assert [r.promoted_generation for r in reports if r.promoted_generation] == [2]
        time.sleep(0.1)
        stop.set()
        reader.join(10)
        # `search` embeds the query with the live generation's model: the new one now.
        assert len(search_source(remote, name, "Renamed 5", 3, "pgvector")) == 3
        assert len(search_source(remote, name, "Renamed 5", 3, "qdrant")) == 3

    assert all(len(models) == 1 for models, _ in seen), "a reader saw two models at once"
    order = [(models[0], size) for models, size in seen]
    assert order[0] == (LOCAL, 384) and order[-1] == (FAKE, 8)
    first_new = next(i for i, (model, _) in enumerate(order) if model == FAKE)
    assert all(model == LOCAL for model, _ in order[:first_new])
    assert all(model == FAKE for model, _ in order[first_new:]), "readers went back"
    q_first_new = next(i for i, (_, size) in enumerate(order) if size == 8)
    assert all(size == 8 for _, size in order[q_first_new:])

    assert states(postgres, name) == {1: "previous", 2: "live"}
    assert server_qdrant.alias_target(name) == f"{name}__g2"
    rows = view_rows(postgres, name)
    expected = {str(i) for i in range(1, 25) if i != 7} | {"100"}
    assert set(rows) == expected
    assert rows["5"] == {"Renamed 5: about topic 5 word0 word1 word2 word3 word4 word5"}
    assert server_qdrant.count(name) == sum(len(t) for t in rows.values())
    # The old generation kept following changes until the switch.
    with engine_for(postgres).connect() as conn:
        query = sa.text(f"SELECT row_id, chunk_text FROM {name}_embeddings__g1")
        old = dict(conn.execute(query).fetchall())
    assert set(old) == expected and old["5"].startswith("Renamed 5")
    report = status_report(remote, name)
    assert report["generation"] == 2 and report["model"] == FAKE
    by_number = {g["number"]: g for g in report["generations"]}
    assert by_number[2]["coverage"] == 1.0 and by_number[1]["state"] == "previous"


def test_template_change_copies_unchanged_chunks_and_plan_is_what_the_build_embeds(
    postgres, home, tmp_path, instance
):
    """Embedded Qdrant engine (no aliases: `search` follows the ledger)."""
    name = unique_name()
    create_docs_table(postgres, name, docs(12, words=60))
    chunking = "{max_tokens: 24, overlap: 0}"
    first = settings_for(tmp_path, name, "a", text="{body}", chunking=chunking)
    sync_ok(first, name, instance)
    # The title goes at the end: every chunk but each row's last keeps its text.
    second = settings_for(tmp_path, name, "b", text="{body} {title}", chunking=chunking)
    plan = plan_report(second, name)
    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    printed = CliRunner().invoke(main, ["--sources", str(second.path), "plan", "--source", name])
    assert printed.exit_code == 0, printed.output
    assert f"generation 2 (not created yet) ({LOCAL})" in printed.output
    assert f"{plan['chunks_to_embed']:,} chunks / {plan['tokens_to_embed']:,} tokens" in (
        printed.output
    )
    assert states(postgres, name) == {1: "live"}  # plan changed nothing
    reports = sync_ok(second, name, instance)
    built = [r for r in reports if r.generation == 2]
    assert sum(r.embedded_chunks for r in built) == plan["chunks_to_embed"]
    assert sum(r.reused_chunks for r in built) == plan["chunks_reused"]
    assert plan["chunks_reused"] > plan["chunks_to_embed"] > 0
    assert states(postgres, name) == {1: "previous", 2: "live"}
    store = qdrant_store_from_env()
    assert store.count(f"{name}__g2") == sum(len(t) for t in view_rows(postgres, name).values())
    with engine_for(postgres).connect() as conn:
        last = conn.scalar(
            sa.text(
                f"SELECT chunk_text FROM {name}_embeddings WHERE row_id = '3' "
                "ORDER BY chunk_index DESC LIMIT 1"
            )
        )
    assert last.endswith("Doc 3")  # the new template's last chunk: generation 1 lacks it
    for backend in ("pgvector", "qdrant"):
        assert search_source(second, name, last, 1, backend)[0]["text"] == last
    # Embedded mode: the stable name is the ledger's pointer, the old collection stays.
    assert store.collection_exists(name) and store.count(name) > 0


def test_metadata_only_change_rewrites_payloads_without_a_new_generation(
    postgres, home, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs(6))
    sync_ok(settings_for(tmp_path, name, "a", metadata="[category]"), name, instance)
    changed = settings_for(tmp_path, name, "b", metadata="[category, views]")
    reports = sync_ok(changed, name, instance)
    assert states(postgres, name) == {1: "live"}
    assert sum(r.embedded_chunks for r in reports) == 0
    assert plan_report(changed, name)["chunks_to_embed"] == 0


def test_a_build_whose_checks_fail_is_not_promoted_and_says_why(
    postgres, server_qdrant, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs(8))
    sync_ok(settings_for(tmp_path, name, "local"), name, instance)
    with ProviderServer("openai", dim=8) as fake:
        fake.zero_text = "Doc 3: about topic 3 word0 word1 word2 word3 word4 word5"
        remote = settings_for(tmp_path, name, "fake", embedder="fake", fake_url=fake.base_url)
        reports = sync_source(remote, name, None, instance)
    assert all(r.success for r in reports)
    assert states(postgres, name) == {1: "live", 2: "building"}
    assert view_models(postgres, name) == [LOCAL]
    assert server_qdrant.alias_target(name) == f"{name}__g1"
    blocked = Generations(engine_for(postgres), name).get(2).blocked_reason
    assert "1 rows failed to embed" in blocked and "row 3" in blocked
    assert any(r.promotion_blocked for r in reports)
    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    result = CliRunner().invoke(
        main, ["--sources", str(remote.path), "generations", "promote", "--source", name]
    )
    assert result.exit_code == 1 and "not promoted" in result.output


def test_manual_promotion_rollback_and_drop(postgres, server_qdrant, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs(10))
    sync_ok(settings_for(tmp_path, name, "a"), name, instance)
    chunking = "{max_tokens: 32, overlap: 4}"
    manual = settings_for(tmp_path, name, "b", chunking=chunking, generations="{promote: manual}")
    sync_ok(manual, name, instance)
    assert states(postgres, name) == {1: "live", 2: "building"}
    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    args = ["--sources", str(manual.path), "generations"]
    result = CliRunner().invoke(main, [*args, "promote", "--source", name])
    assert result.exit_code == 0, result.output
    assert states(postgres, name) == {1: "previous", 2: "live"}
    assert server_qdrant.alias_target(name) == f"{name}__g2"

    # Rollback: generation 1 missed this change while previous, and catches up first.
    execute(postgres, f"UPDATE {name} SET title = 'Back 4' WHERE id = 4")
    result = CliRunner().invoke(main, [*args, "rollback", "--source", name])
    assert result.exit_code == 0, result.output
    assert states(postgres, name) == {1: "building", 2: "live"}
    sync_ok(manual, name, instance)
    assert states(postgres, name) == {1: "live", 2: "previous"}
    assert server_qdrant.alias_target(name) == f"{name}__g1"
    assert any(t.startswith("Back 4") for t in view_rows(postgres, name)["4"])

    result = CliRunner().invoke(main, [*args, "drop", "--source", name, "--generation", "1"])
    assert result.exit_code == 1 and "is live" in result.output
    # sources.yaml still asks for generation 2's chunking: dropping it would rebuild it.
    result = CliRunner().invoke(main, [*args, "drop", "--source", name, "--generation", "2"])
    assert result.exit_code == 1 and "built again" in result.output
    back = ["--sources", str(tmp_path / f"{name}-a.yaml"), "generations"]
    result = CliRunner().invoke(main, [*back, "drop", "--source", name, "--generation", "2"])
    assert result.exit_code == 0, result.output
    assert states(postgres, name) == {1: "live", 2: "dropped"}
    assert not server_qdrant.collection_exists(f"{name}__g2")
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(sa.text(f"SELECT to_regclass('{name}_embeddings__g2')")) is None
        left = conn.scalar(
            sa.text("SELECT count(*) FROM embedding_assets.row_state WHERE target = :t"),
            {"t": f"public.{name}_embeddings__g2"},
        )
    assert left == 0
    listed = generations_report(settings_for(tmp_path, name, "a"), name)
    assert [g["state"] for g in listed] == ["live", "dropped"]
    import json

    result = CliRunner().invoke(main, [*back, "list", "--source", name, "--json"])
    shown = json.loads(result.output)[name]
    assert [(g["number"], g["state"]) for g in shown] == [(1, "live"), (2, "dropped")]
    assert shown[0]["coverage"] == 1.0 and shown[0]["promoted_at"]


def column_types(url: str, table: str) -> dict[str, str]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = to_regclass(:t) AND attname LIKE 'embedding%' "
                "AND NOT attisdropped"
            ),
            {"t": table},
        )
        return dict(rows.fetchall())


def column_models(url: str, table: str, column: str) -> dict[str | None, int]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(sa.text(f"SELECT {column}, count(*) FROM {table} GROUP BY 1"))
        return dict(rows.fetchall())


def test_model_change_with_write_back_switches_column_readers_at_promotion(
    postgres, home, tmp_path, instance
):
    """The live generation owns `embedding`; the build fills `embedding__g2` beside it, and
    promotion swaps the names in its transaction. Rollback swaps them back; drop removes
    the shadow columns."""
    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    name = unique_name()
    create_docs_table(postgres, name, docs(10))
    write_back = "{column: embedding, model_column: embedding_model}"
    with ProviderServer("openai", dim=8) as server:
        first = settings_for(
            tmp_path, name, "a", fake_url=server.base_url, write_back=write_back,
            generations="{promote: manual}",
        )  # fmt: skip
        sync_ok(first, name, instance)
        assert column_types(postgres, name) == {
            "embedding": "vector(384)",
            "embedding_model": "text",
        }
        second = settings_for(
            tmp_path, name, "b", embedder="fake", fake_url=server.base_url,
            write_back=write_back, generations="{promote: manual}",
        )  # fmt: skip
        sync_ok(second, name, instance)
        execute(postgres, f"UPDATE {name} SET title = 'Changed 3' WHERE id = 3")
        sync_ok(second, name, instance)
        assert states(postgres, name) == {1: "live", 2: "building"}
        # Readers of the column still get the old model, whole; the build has its own.
        assert column_models(postgres, name, "embedding_model") == {LOCAL: 10}
        assert column_models(postgres, name, "embedding_model__g2") == {FAKE: 10}
        assert column_types(postgres, name)["embedding__g2"] == "vector(8)"

        args = ["--sources", str(second.path), "generations"]
        result = CliRunner().invoke(main, [*args, "promote", "--source", name])
        assert result.exit_code == 0, result.output
        assert column_types(postgres, name) == {
            "embedding": "vector(8)",
            "embedding_model": "text",
            "embedding__g1": "vector(384)",
            "embedding_model__g1": "text",
        }
        assert column_models(postgres, name, "embedding_model") == {FAKE: 10}
        filler = " ".join(f"word{j}" for j in range(6))
        # The exact text of a row finds that row (the test server's vectors carry no meaning).
        hits = search_source(second, name, f"Changed 3: about topic 3 {filler}", 1, "column")
        assert hits[0]["row_id"] == "3" and hits[0]["score"] > 0.999
        assert status_report(second, name)["column_rows"] == 10

        # Rollback: generation 1 catches up on what it missed, and takes the name back.
        execute(postgres, f"UPDATE {name} SET title = 'Back 4' WHERE id = 4")
        result = CliRunner().invoke(main, [*args, "rollback", "--source", name])
        assert result.exit_code == 0, result.output
        sync_ok(second, name, instance)
        assert states(postgres, name) == {1: "live", 2: "previous"}
        assert column_types(postgres, name)["embedding"] == "vector(384)"
        assert column_models(postgres, name, "embedding_model") == {LOCAL: 10}
        hits = search_source(first, name, f"Back 4: about topic 4 {filler}", 1, "column")
        assert hits[0]["row_id"] == "4"

        back = ["--sources", str(first.path), "generations"]
        result = CliRunner().invoke(main, [*back, "drop", "--source", name, "--generation", "2"])
        assert result.exit_code == 0, result.output
        assert column_types(postgres, name) == {
            "embedding": "vector(384)",
            "embedding_model": "text",
        }


def test_previous_generation_expires_after_keep_previous_hours(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs(4))
    sync_ok(settings_for(tmp_path, name, "a"), name, instance)
    now = settings_for(
        tmp_path, name, "b", chunking="{max_tokens: 32, overlap: 4}",
        generations="{keep_previous_hours: 0}",
    )  # fmt: skip
    sync_ok(now, name, instance)  # promoted, and at once past 0 hours: dropped
    assert states(postgres, name) == {1: "dropped", 2: "live"}
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(sa.text(f"SELECT to_regclass('{name}_embeddings__g1')")) is None
    # This sync still had generation 1's collection open; the next run removes it.
    execute(postgres, f"UPDATE {name} SET title = 'x' WHERE id = 1")
    sync_ok(now, name, instance)
    assert not qdrant_store_from_env().collection_exists(name)


def test_crash_between_view_and_alias_switch_converges(
    postgres, server_qdrant, tmp_path, instance, monkeypatch
):
    """The process dies after the registry and view switched, before the alias did
    (simulated in-process: the :memory: Qdrant cannot outlive a killed process)."""
    name = unique_name()
    create_docs_table(postgres, name, docs(6))
    sync_ok(settings_for(tmp_path, name, "a"), name, instance)
    changed = settings_for(tmp_path, name, "b", chunking="{max_tokens: 32, overlap: 4}")

    def die(self, alias: str, collection: str) -> None:
        raise RuntimeError("process killed before the alias switch")

    alive = type(server_qdrant).point_alias
    monkeypatch.setattr(type(server_qdrant), "point_alias", die)
    reports = sync_source(changed, name, None, instance)
    assert "killed before the alias switch" in reports[-1].error
    assert states(postgres, name) == {1: "previous", 2: "live"}
    assert view_models(postgres, name) == [LOCAL]  # both generations hold the local model
    with engine_for(postgres).connect() as conn:
        view = sa.text("SELECT count(DISTINCT chunk_index) > 1 FROM " + f"{name}_embeddings")
        assert conn.scalar(view) is not None
    # Readers of the alias still get generation 1, whole: not a mix.
    assert server_qdrant.alias_target(name) == f"{name}__g1"
    monkeypatch.setattr(type(server_qdrant), "point_alias", alive)
    live = runtime_for(changed, name, postgres, "live")
    moved = converge_readers(
        live.engine, name, live.stable_table, live.stable_collection, live.qdrant.store
    )
    assert moved == ["alias"]
    assert server_qdrant.alias_target(name) == f"{name}__g2"


def test_kill_9_during_the_build_converges(
    postgres,
    home,
    tmp_path,
    instance,
    dagster_url,  # noqa: F811 (the fixture)
):
    """A real `embedding-assets sync` building generation 2 with the local model is killed
    with SIGKILL mid-build; the next sync finishes and promotes one consistent generation."""
    name = unique_name()
    create_docs_table(postgres, name, docs(400, words=30))
    first = settings_for(tmp_path, name, "a", chunking="{max_tokens: 32, overlap: 4}")
    sync_ok(first, name, instance)
    second = settings_for(tmp_path, name, "b", chunking="{max_tokens: 24, overlap: 2}")
    child = run_sync(second.path, name, dagster_url, stderr=subprocess.PIPE, text=True)
    target = f"public.{name}_embeddings__g2"
    deadline = time.time() + 240
    with engine_for(postgres).connect() as conn:
        while time.time() < deadline and child.poll() is None:
            written = conn.scalar(
                sa.text("SELECT count(*) FROM embedding_assets.row_state WHERE target = :t"),
                {"t": target},
            )
            conn.rollback()
            if written:
                break
            time.sleep(0.05)
    assert child.poll() is None, f"the sync ended before it could be killed: {child.stderr.read()}"
    kill(child)
    assert states(postgres, name) == {1: "live", 2: "building"}
    assert view_models(postgres, name) == [LOCAL]

    sync_ok(second, name, instance)
    assert states(postgres, name) == {1: "previous", 2: "live"}
    live = runtime_for(second, name, postgres, "live")
    work = live.exact_work()
    assert sum(w.pending_rows for w in work.values()) == 0
    store = qdrant_store_from_env()
    assert store.count(f"{name}__g2") == sum(len(t) for t in view_rows(postgres, name).values())


def test_daily_token_budget_makes_rows_wait_without_failing(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs(20))
    # Usage is per embedder and day, whatever the source: earlier tests used `local` too.
    migrate(engine_for(postgres))
    execute(postgres, "DELETE FROM embedding_assets.token_usage WHERE embedder = 'local'")
    budget = settings_for(tmp_path, name, "a", budget="max_tokens_per_day: 100")
    reports = sync_ok(budget, name, instance)
    assert sum(r.rows_waiting_for_budget for r in reports) > 0
    report = status_report(budget, name)
    assert 0 < report["embedded_rows"] < 20
    assert report["token_budget"]["tokens_used_today"] <= 100
    assert report["pending_rows"] == 20 - report["embedded_rows"]
    assert report["failed_rows"] == 0
    with engine_for(postgres).connect() as conn:
        used = conn.scalar(
            sa.text("SELECT tokens FROM embedding_assets.token_usage WHERE embedder = 'local'")
        )
    assert 0 < used <= 100
    # A bigger budget (or the next day) lets the rest through.
    execute(postgres, "DELETE FROM embedding_assets.token_usage WHERE embedder = 'local'")
    sync_ok(settings_for(tmp_path, name, "b", budget="max_tokens_per_day: 100000"), name, instance)
    assert status_report(budget, name)["embedded_rows"] == 20


def test_state_from_before_generations_is_adopted_as_generation_1(
    postgres, home, tmp_path, instance
):
    """A chunk table and ledger made before generations existed (rebuilt here by undoing
    what adoption does) become generation 1 with nothing embedded again."""
    name = unique_name()
    create_docs_table(postgres, name, docs(6))
    settings = settings_for(tmp_path, name, "a")
    sync_ok(settings, name, instance)
    table = f"{name}_embeddings"
    # Changed while the (old-style) trigger still queues for the source's only target.
    execute(postgres, f"UPDATE {name} SET body = 'changed' WHERE id = 2")
    execute(
        postgres,
        f"DROP VIEW {table}",
        f"ALTER TABLE {table}__g1 RENAME TO {table}",
        f"ALTER INDEX {table}__g1_embedding_hnsw RENAME TO {table}_embedding_hnsw",
        f"DELETE FROM embedding_assets.generations WHERE source = '{name}'",
    )
    from embedding_assets.sync import runtime as runtime_module

    runtime_module._RUNTIMES.clear()
    reports = sync_ok(settings, name, instance)
    assert states(postgres, name) == {1: "live"}
    assert sum(r.embedded_chunks for r in reports) == 1  # only the changed row
    with engine_for(postgres).connect() as conn:
        kinds = dict(
            conn.execute(
                sa.text("SELECT relname, relkind FROM pg_class WHERE relname LIKE :p"),
                {"p": f"{table}%"},
            ).fetchall()
        )
    assert kinds[table] == "v" and kinds[f"{table}__g1"] == "r"
    assert kinds[f"{table}__g1_embedding_hnsw"] == "i"
    assert f"{table}_embedding_hnsw" not in kinds
    assert len(view_rows(postgres, name)) == 6


def test_the_sensor_asks_for_runs_of_both_generations_tagged_with_each(
    postgres, home, tmp_path, instance
):
    from embedding_assets.definitions import build_definitions
    from embedding_assets.defs.resources import GENERATION_TAG, SHARDS_TAG

    def tick(settings: Settings):
        defs = build_definitions(settings)
        sensor = defs.resolve_sensor_def(f"{name}_changes")
        with dg.build_sensor_context(
            instance=instance, resources=defs.resources, definitions=defs
        ) as context:
            return sensor.evaluate_tick(context)

    name = unique_name()
    create_docs_table(postgres, name, docs(10))
    sync_ok(settings_for(tmp_path, name, "a"), name, instance)
    chunking = "{max_tokens: 32, overlap: 4}"
    manual = settings_for(tmp_path, name, "b", chunking=chunking, generations="{promote: manual}")
    first = tick(manual)  # registers generation 2 and asks for its build: one run, both shards
    assert [
        (r.tags[GENERATION_TAG], r.tags["embedding_assets/generation_state"], r.tags[SHARDS_TAG])
        for r in first.run_requests
    ] == [("2", "building", "00,01")]
    execute(postgres, f"UPDATE {name} SET title = 'Moved 3' WHERE id = 3")
    both = {r.tags[GENERATION_TAG]: r.tags[SHARDS_TAG] for r in tick(manual).run_requests}
    assert set(both) == {"1", "2"}  # one run per generation; the live one follows the change
    assert both["1"] in ("00", "01")
    sync_ok(manual, name, instance)
    idle = tick(manual)
    assert not idle.run_requests
    assert "generation 2 is built and waits for `embedding-assets generations promote" in (
        idle.skip_message
    )


KILL_AT_SWITCH = """
import os, signal, sys
import embedding_assets.sync.promotion as promotion

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # the build's last write is committed; no switch

promotion._switch = killed
from embedding_assets.cli.main import main
main(sys.argv[1:])
"""


def test_a_build_killed_at_its_promotion_goes_live_at_the_next_sync(
    postgres,
    home,
    tmp_path,
    instance,
    dagster_url,  # noqa: F811 (the fixture)
):
    """kill -9 after the build's last write committed, at the moment of the switch: the
    build is complete (coverage 100 %) but `building`. The next sync, with no row changed
    and no shard with work, checks and promotes it."""
    import os
    import sys

    name = unique_name()
    create_docs_table(postgres, name, docs(12))
    sync_ok(settings_for(tmp_path, name, "a"), name, instance)
    second = settings_for(tmp_path, name, "b", chunking="{max_tokens: 32, overlap: 4}")
    child = subprocess.run(
        [sys.executable, "-c", KILL_AT_SWITCH, "--sources", str(second.path), "sync"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "EMBEDDING_ASSETS_DAGSTER_PG_URL": dagster_url},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -9, child.stderr[-2000:]
    assert states(postgres, name) == {1: "live", 2: "building"}
    building = runtime_for(second, name, postgres, 2)
    assert not any(w.has_work for w in building.work().values())  # nothing left to write

    # As `embedding-assets sync` runs: only shards with work, and there are none.
    assert sync_source(second, name, None, instance, every_shard=False) == []
    assert states(postgres, name) == {1: "previous", 2: "live"}
    assert view_rows(postgres, name) and all(
        len(t) == 1 for t in view_rows(postgres, name).values()
    )
    listed = {g["number"]: g for g in generations_report(second, name)}
    assert listed[2]["state"] == "live"


def test_a_rollback_with_nothing_changed_goes_live_at_the_next_sync(
    postgres, server_qdrant, tmp_path, instance
):
    name = unique_name()
    create_docs_table(postgres, name, docs(8))
    first = settings_for(tmp_path, name, "a")
    sync_ok(first, name, instance)
    second = settings_for(tmp_path, name, "b", chunking="{max_tokens: 32, overlap: 4}")
    sync_ok(second, name, instance)
    assert states(postgres, name) == {1: "previous", 2: "live"}
    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    args = ["--sources", str(second.path), "generations", "rollback", "--source", name]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "0 rows queued" in result.output
    assert states(postgres, name) == {1: "building", 2: "live"}
    assert sync_source(second, name, None, instance, every_shard=False) == []
    assert states(postgres, name) == {1: "live", 2: "previous"}
    assert server_qdrant.alias_target(name) == f"{name}__g1"


def test_the_sensor_promotes_a_finished_build_with_no_work_left(
    postgres, server_qdrant, tmp_path, instance
):
    """A rollback target already current (nothing queued): no shard has work, so no run
    would ever promote it; the sensor's next tick checks and promotes it."""
    from click.testing import CliRunner

    from embedding_assets.cli.main import main
    from embedding_assets.definitions import build_definitions

    name = unique_name()
    create_docs_table(postgres, name, docs(8))
    sync_ok(settings_for(tmp_path, name, "a"), name, instance)
    second = settings_for(tmp_path, name, "b", chunking="{max_tokens: 32, overlap: 4}")
    sync_ok(second, name, instance)
    args = ["--sources", str(second.path), "generations", "rollback", "--source", name]
    assert CliRunner().invoke(main, args).exit_code == 0
    assert states(postgres, name) == {1: "building", 2: "live"}
    defs = build_definitions(second)
    sensor = defs.resolve_sensor_def(f"{name}_changes")
    with dg.build_sensor_context(
        instance=instance, resources=defs.resources, definitions=defs
    ) as context:
        result = sensor.evaluate_tick(context)
    assert not result.run_requests
    assert states(postgres, name) == {1: "live", 2: "previous"}
    assert server_qdrant.alias_target(name) == f"{name}__g1"


ANIMALS = ["giraffe", "walrus", "pelican", "octopus", "badger", "flamingo", "tortoise", "lynx"]


def test_a_build_that_retrieves_worse_on_the_labelled_queries_is_not_promoted(
    postgres, home, tmp_path, instance
):
    """The quality gate: the same queries on the live generation and on the build, in the
    readers' default mode (hybrid); a drop beyond max_drop blocks, with both figures."""
    import json

    name = unique_name()
    rows = [
        {"id": i, "title": f"Doc {i}", "body": f"a story about a {animal}", "category": "a"}
        for i, animal in enumerate(ANIMALS, start=1)
    ]
    create_docs_table(postgres, name, rows)
    (tmp_path / "queries.jsonl").write_text(
        "".join(
            json.dumps({"query": r["body"].split()[-1], "relevant": [r["id"]]}) + "\n" for r in rows
        )
    )
    gate = "{evaluate: {queries: queries.jsonl, metric: ndcg_at_10, max_drop: 0.02}}"
    first = settings_for(tmp_path, name, "a", generations=gate)
    sync_ok(first, name, instance)
    from embedding_assets.cli.plan import plan_report

    live = plan_report(first, name)["live_quality"]  # what `plan` prints
    assert live["value"] == 1.0 and live["queries"] == 8 and live["metric"] == "ndcg_at_10"
    # The new template drops the body: the animals are no longer in the text.
    titles_only = settings_for(tmp_path, name, "b", text="{title}", generations=gate)
    reports = sync_ok(titles_only, name, instance)
    assert states(postgres, name) == {1: "live", 2: "building"}
    blocked = Generations(engine_for(postgres), name).get(2).blocked_reason
    assert "retrieval quality dropped: ndcg_at_10" in blocked, blocked
    assert "against the live generation's 1.0000" in blocked  # each animal finds its row
    assert "pgvector hybrid, 8 queries" in blocked
    assert any(r.promotion_blocked for r in reports)
