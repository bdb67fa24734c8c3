"""End to end: a source table synced shard by shard into pgvector and the embedded Qdrant
engine through the real job, the real model and a real PostgreSQL with pgvector."""

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.core.sharding import shard_of
from embedding_assets.embedders.build import make_embedder
from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    materialization_metadata,
    sync_shards,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf"]
WORDS += ["hotel", "india", "juliet", "kilo", "lima", "mike"]


def long_body(seed: int, words: int = 1200) -> str:
    return " ".join(f"{WORDS[(i * seed) % len(WORDS)]}{i % 97}" for i in range(words))


def docs(n: int) -> list[dict]:
    return [
        {"id": i, "title": f"Package {i}", "body": f"A library number {i} for {WORDS[i % 13]}"}
        for i in range(1, n + 1)
    ]


def stored_state(url: str, settings, source: str) -> dict:
    """Everything both sinks hold for the source: pgvector rows and Qdrant points."""
    spec = settings.source(source)
    store = runtime_for(settings, source, url)
    with engine_for(url).connect() as conn:
        rows = conn.execute(
            sa.text(
                f"SELECT CAST(point_id AS text), row_id, chunk_index, chunk_hash, category, views,"
                f" updated_at FROM {store.pgvector.table} ORDER BY point_id"
            )
        ).fetchall()
    qdrant = qdrant_store_from_env()
    points = qdrant.retrieve(spec.qdrant_collection, [r[0] for r in rows])
    return {
        "pgvector": [tuple(r) for r in rows],
        "qdrant_ids": sorted(p.id for p in points),
        "qdrant_count": qdrant.count(spec.qdrant_collection),
    }


@pytest.fixture
def instance():
    with dg.DagsterInstance.ephemeral() as inst:
        yield inst


def test_first_sync_then_rerun_changes_nothing(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(
        postgres,
        name,
        docs(40)
        + [
            {"id": 41, "title": "Archived", "body": "old", "archived": True},
            {"id": 42, "title": None, "body": None},
            {"id": 43, "title": " ", "body": ""},
        ],
    )
    settings = write_settings(tmp_path, name, name)
    results = sync_shards(settings, name, instance)
    assert all(r.success for r in results.values())

    state = stored_state(postgres, settings, name)
    row_ids = {r[1] for r in state["pgvector"]}
    # Eligible rows with text: 1..40. Archived row 41 is filtered out; 42/43 have no text.
    assert row_ids == {str(i) for i in range(1, 41)}
    assert len(state["pgvector"]) == 40  # short texts: one chunk each
    assert state["qdrant_ids"] == sorted(r[0] for r in state["pgvector"])
    assert state["qdrant_count"] == 40
    # Metadata columns are stored beside each vector.
    assert {(r[4], r[5]) for r in state["pgvector"]} == {("misc", 0)}

    empty_counted = sum(
        materialization_metadata(r, "pending_rows")["empty_text_rows"] for r in results.values()
    )
    assert empty_counted == 2
    embedded = sum(
        materialization_metadata(r, "embeddings")["embedded_chunks"] for r in results.values()
    )
    assert embedded == 40

    store = runtime_for(settings, name, postgres)
    work = store.exact_work()
    assert sum(w.eligible_rows for w in work.values()) == 42
    assert sum(w.embedded_rows for w in work.values()) == 42
    assert not any(w.has_work for w in work.values())

    # Re-running every shard changes nothing: no rows pending, no write, same stored state.
    again = sync_shards(settings, name, instance)
    assert all(r.success for r in again.values())
    for result in again.values():
        assert materialization_metadata(result, "pending_rows")["rows"] == 0
        assert materialization_metadata(result, "embeddings")["embedded_chunks"] == 0
    assert stored_state(postgres, settings, name) == state


def test_update_reuses_unchanged_chunks_and_deletes_leave_both_sinks(
    postgres, home, tmp_path, instance
):
    name = unique_name()
    body = long_body(7)
    rows = docs(12) + [{"id": 100, "title": "Long", "body": body}]
    create_docs_table(postgres, name, rows)
    settings = write_settings(tmp_path, name, name)
    sync_shards(settings, name, instance)
    store = runtime_for(settings, name, postgres)
    chunks_before = store.pgvector.chunk_counts()
    long_shard = shard_of("100", 4)
    long_chunks = chunks_before[long_shard] - sum(
        1 for r in docs(12) if shard_of(str(r["id"]), 4) == long_shard
    )
    assert long_chunks >= 20

    engine = engine_for(postgres)
    with engine.begin() as conn:
        # Change only the end of the long text: its leading chunks keep their hashes.
        conn.execute(
            sa.text(f"UPDATE {name} SET body = :b WHERE id = 100"), {"b": body + " zulu tango"}
        )
        conn.execute(sa.text(f"DELETE FROM {name} WHERE id = 3"))
        conn.execute(sa.text(f"UPDATE {name} SET archived = true WHERE id = 5"))
        conn.execute(sa.text(f"UPDATE {name} SET category = 'tools' WHERE id = 7"))

    work = store.exact_work()
    assert sum(w.pending_rows for w in work.values()) == 4
    # One shard's figures (what the coverage check reads) equal its share of the full diff.
    for shard, shard_work in work.items():
        assert store.exact_work(shard) == {shard: shard_work}
    shards_with_work = sorted(
        settings.source(name).shard_keys[s] for s, w in work.items() if w.has_work
    )
    results = sync_shards(settings, name, instance, shards_with_work)
    assert all(r.success for r in results.values())

    long_result = results[settings.source(name).shard_keys[long_shard]]
    meta = materialization_metadata(long_result, "embeddings")
    assert 1 <= meta["embedded_chunks"] <= 2
    assert meta["reused_chunks"] >= long_chunks - 2

    state = stored_state(postgres, settings, name)
    row_ids = {r[1] for r in state["pgvector"]}
    assert "3" not in row_ids and "5" not in row_ids
    assert {r[4] for r in state["pgvector"] if r[1] == "7"} == {"tools"}
    assert state["qdrant_ids"] == sorted(r[0] for r in state["pgvector"])
    assert state["qdrant_count"] == len(state["pgvector"])
    qdrant = qdrant_store_from_env()
    hits = qdrant.retrieve(
        settings.source(name).qdrant_collection, [r[0] for r in state["pgvector"] if r[1] == "7"]
    )
    assert hits[0].payload["category"] == "tools"
    assert not any(w.has_work for w in store.exact_work().values())


def test_long_text_chunks_within_max_tokens_with_overlap(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "Long", "body": long_body(5, 2000)}])
    settings = write_settings(tmp_path, name, name)
    sync_shards(settings, name, instance, [settings.source(name).shard_keys[shard_of("1", 4)]])
    store = runtime_for(settings, name, postgres)
    with engine_for(postgres).connect() as conn:
        chunks = conn.execute(
            sa.text(
                f"SELECT chunk_text, token_count FROM {store.pgvector.table} ORDER BY chunk_index"
            )
        ).fetchall()
    tokenizer = make_embedder(settings.embedders["local"]).tokenizer
    assert len(chunks) >= 20
    assert all(tokenizer.count(text) <= 64 and count <= 64 for text, count in chunks)
    for (first, _), (second, _) in zip(chunks, chunks[1:], strict=False):
        # Consecutive chunks share their boundary tokens (overlap 8).
        tail = first.split()[-2:]
        assert " ".join(tail) in second


def test_search_finds_exact_text_first_in_both_backends(postgres, home, tmp_path, instance):
    from embedding_assets.cli.search import search_source

    name = unique_name()
    create_docs_table(postgres, name, docs(30))
    settings = write_settings(tmp_path, name, name)
    sync_shards(settings, name, instance)
    text = "Package 17: A library number 17 for echo"
    for backend in ("pgvector", "qdrant"):
        hits = search_source(settings, name, text, 5, backend, mode="dense")
        assert hits[0]["row_id"] == "17", (backend, hits)
        assert hits[0]["score"] > 0.99  # cosine similarity
    # pgvector's default is hybrid: first too, with the fused score (first in both, ranks
    # from 0: 1 / 10 + 1.5 / 10, core.fusion).
    hybrid = search_source(settings, name, text, 5, "pgvector")
    assert hybrid[0]["row_id"] == "17" and 0 < hybrid[0]["score"] <= 2.5 / 10 + 1e-9


def test_crash_between_pgvector_and_qdrant_converges(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs(20))
    settings = write_settings(tmp_path, name, name, shards="1")
    from embedding_assets.definitions import build_definitions

    job = build_definitions(settings).resolve_job_def(f"{name}_sync")
    # A run that dies after the pgvector write: materialize up to embeddings only.
    result = job.execute_in_process(
        partition_key="00",
        instance=instance,
        asset_selection=[dg.AssetKey([name, s]) for s in ("pending_rows", "chunks", "embeddings")],
    )
    assert result.success
    store = runtime_for(settings, name, postgres)
    work = store.exact_work()[0]
    assert work.pending_rows == 0 and work.qdrant_lag_rows == 20
    # The next full run finds nothing to embed but converges Qdrant from durable state.
    sync_shards(settings, name, instance)
    state = stored_state(postgres, settings, name)
    assert state["qdrant_count"] == 20
    assert not store.exact_work()[0].has_work

    # Qdrant loses points behind our back: the next run notices and resends them.
    qdrant = qdrant_store_from_env()
    qdrant.delete(settings.source(name).qdrant_collection, state["qdrant_ids"][:5])
    result = sync_shards(settings, name, instance)["00"]
    assert materialization_metadata(result, "vector_index")["reconciled_shard"] is True
    assert stored_state(postgres, settings, name)["qdrant_count"] == 20


def test_model_id_is_stored_with_every_vector(postgres, home, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, docs(5))
    settings = write_settings(tmp_path, name, name, shards="1")
    sync_shards(settings, name, instance)
    store = runtime_for(settings, name, postgres)
    with engine_for(postgres).connect() as conn:
        models = conn.scalars(sa.text(f"SELECT DISTINCT model FROM {store.pgvector.table}")).all()
    assert models == [SentenceTransformerEmbedder().model_id]


def test_qdrant_client_code_path_in_memory(postgres, home, tmp_path, instance, monkeypatch):
    """QDRANT_URL selects the qdrant-client store; `:memory:` runs that code path in-process."""
    from embedding_assets.cli.search import search_source
    from embedding_assets.destinations.qdrant_server import ServerQdrantStore

    monkeypatch.setenv("QDRANT_URL", ":memory:")
    assert isinstance(qdrant_store_from_env(), ServerQdrantStore)
    name = unique_name()
    create_docs_table(postgres, name, docs(25))
    settings = write_settings(tmp_path, name, name, shards="2")
    assert all(r.success for r in sync_shards(settings, name, instance).values())
    state = stored_state(postgres, settings, name)
    assert state["qdrant_count"] == 25
    assert state["qdrant_ids"] == sorted(r[0] for r in state["pgvector"])
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"DELETE FROM {name} WHERE id <= 5"))
    sync_shards(settings, name, instance)
    assert stored_state(postgres, settings, name)["qdrant_count"] == 20
    hits = search_source(settings, name, "Package 9: A library number 9 for juliet", 3, "qdrant")
    assert hits[0]["row_id"] == "9"


def test_text_and_uuid_keys_and_sql_sharding_matches_python(postgres, home, tmp_path, instance):
    """Rows keyed by text or uuid land in the shard Python computes for them."""
    import uuid

    name = unique_name()
    ids = [str(uuid.UUID(int=i * 7919)) for i in range(1, 31)]
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (id uuid PRIMARY KEY, title text, body text)"))
        conn.execute(
            sa.text(f"INSERT INTO {name} VALUES (CAST(:id AS uuid), :t, :b)"),
            [{"id": i, "t": f"T {i}", "b": "body"} for i in ids],
        )
    path = tmp_path / "uuid.yaml"
    path.write_text(
        "embedders: {local: {provider: sentence_transformers}}\n"
        f"sources: [{{name: {name}, table: {name}, text: '{{title}} {{body}}', shards: 5}}]\n"
    )
    from embedding_assets.config.settings import load_settings

    settings = load_settings(path)
    sync_shards(settings, name, instance)
    with engine_for(postgres).connect() as conn:
        stored = conn.execute(
            sa.text(f"SELECT row_id, shard FROM public.{name}_embeddings")
        ).fetchall()
    assert sorted(r.row_id for r in stored) == sorted(ids)
    assert all(r.shard == shard_of(r.row_id, 5) for r in stored)


def test_model_or_chunking_change_is_handled_without_mixing(postgres, home, tmp_path, instance):
    """A chunking change makes every row pending in a new generation; another model is
    refused for the live generation's table."""
    from embedding_assets.state.ledger import ModelMismatchError

    name = unique_name()
    create_docs_table(postgres, name, docs(6))
    settings = write_settings(tmp_path, name, name, shards="1")
    sync_shards(settings, name, instance)
    rechunked = write_settings(
        tmp_path, name, name, shards="1", chunking="{max_tokens: 32, overlap: 4}"
    )
    assert runtime_for(rechunked, name, postgres).exact_work()[0].pending_rows == 6

    ledger = runtime_for(settings, name, postgres, "live").ledger
    with (
        pytest.raises(ModelMismatchError, match="One table holds one model"),
        engine_for(postgres).begin() as conn,
    ):
        ledger.claim_target(conn, "sentence_transformers:other", 384, 1, name, "built")
