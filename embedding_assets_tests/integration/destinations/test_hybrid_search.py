"""Lexical and hybrid search in pgvector: the chunk table's generated full-text column, kept by
every write, searched alone or fused with the vectors by reciprocal rank. Real Postgres +
pgvector; the embedder is an OpenAI-compatible server on 127.0.0.1 whose vectors are hashes
of the text (so dense search alone cannot find a rare word: lexical must)."""

import pytest
import sqlalchemy as sa

from embedding_assets.cli.plan import plan_report
from embedding_assets.cli.search import search_source
from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import load_settings
from embedding_assets.state.db import engine_for
from embedding_assets.state.generations import Generations, pipeline_key
from embedding_assets.sync.evaluation import MODES
from embedding_assets.sync.generations import QDRANT_LEXICAL, runtime_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration

ROWS = [
    {"id": i, "title": f"Widget {i}", "body": f"an ordinary widget number {i}"}
    for i in range(1, 31)
]
ROWS[16] = {"id": 17, "title": "Gadget", "body": "fails with error ZXQ-4821 on startup"}


def settings_with(tmp_path, fake, name: str, **source: str):
    return load_settings(
        fake_embedder_settings(tmp_path, name, fake.base_url, {}, {"shards": "2", **source})
    )


@pytest.fixture
def synced(postgres, home, fake, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, ROWS)
    settings = settings_with(tmp_path, fake, name)
    sync_shards(settings, name, instance)
    return settings, name


def test_lexical_and_hybrid_find_a_rare_code_that_dense_ranks_anywhere(synced) -> None:
    settings, name = synced
    query = "ZXQ-4821"
    lexical = search_source(settings, name, query, 5, "pgvector", mode="lexical")
    assert [h["row_id"] for h in lexical] == ["17"]  # only the chunk holding the code
    hybrid = search_source(settings, name, query, 5, "pgvector")  # hybrid: the default
    assert hybrid[0]["row_id"] == "17" and len(hybrid) == 5
    assert hybrid[0]["score"] > hybrid[1]["score"]
    dense = search_source(settings, name, query, 30, "pgvector", mode="dense")
    assert len(dense) == 30 and all(-1 <= h["score"] <= 1 for h in dense)
    # Any word of the query finds a chunk (OR of lexemes); more shared words rank higher.
    words = search_source(settings, name, "startup widget 3", 3, "pgvector", mode="lexical")
    assert words[0]["row_id"] == "3" and {h["row_id"] for h in words} >= {"3"}


def test_qdrant_finds_the_code_lexically_and_hybrid_in_its_sparse_vector(synced) -> None:
    settings, name = synced
    lexical = search_source(settings, name, "ZXQ-4821", 5, "qdrant", mode="lexical")
    assert [h["row_id"] for h in lexical] == ["17"]
    hybrid = search_source(settings, name, "ZXQ-4821", 5, "qdrant")  # hybrid: the default
    assert hybrid[0]["row_id"] == "17" and len(hybrid) == 5


def generation_states(url: str, name: str) -> dict[int, str]:
    return {g.number: g.state for g in Generations(engine_for(url), name).all()}


def synced_all(settings, name: str, instance) -> None:
    reports = sync_source(settings, name, None, instance)
    assert all(r.success for r in reports), [r.error for r in reports]


def test_a_collection_without_the_sparse_vector_gets_it_through_a_new_generation(
    postgres, home, fake, tmp_path, instance
) -> None:
    """A Qdrant collection cannot gain a named vector: one made without `lexical` (hybrid
    off, or by a version before hybrid search) is built again beside the live one, its
    vectors copied by chunk hash (the embedder is not called), and promoted."""
    from click import ClickException

    name = unique_name()
    create_docs_table(postgres, name, ROWS)
    dense_only = settings_with(tmp_path, fake, name, hybrid="false")
    synced_all(dense_only, name, instance)
    turned_on = settings_with(tmp_path, fake, name, hybrid="true")
    assert plan_report(turned_on, name)["generation"] == "2 (not created yet)"
    with pytest.raises(ClickException, match="lacks.*a new generation"):
        search_source(turned_on, name, "ZXQ-4821", 3, "qdrant", mode="hybrid")
    embedded = len(fake.requests)
    synced_all(turned_on, name, instance)
    assert generation_states(postgres, name) == {1: "previous", 2: "live"}
    assert len(fake.requests) == embedded  # every vector copied, none embedded
    assert search_source(turned_on, name, "ZXQ-4821", 3, "qdrant")[0]["row_id"] == "17"
    lexical = search_source(turned_on, name, "ZXQ-4821", 3, "qdrant", mode="lexical")
    assert [h["row_id"] for h in lexical] == ["17"]
    # Off again: the collection's sparse vector costs nothing, so nothing is built.
    synced_all(dense_only, name, instance)
    assert (
        generation_states(postgres, name)[2] == "live"
        and len(generation_states(postgres, name)) == 2
    )


def test_a_collection_that_has_the_sparse_vector_is_kept_at_upgrade(
    postgres, home, fake, tmp_path, instance
) -> None:
    """A generation registered before the lexical side was part of the pipeline key, whose
    collection already has it, is recorded as the configured pipeline: nothing is built."""
    name = unique_name()
    create_docs_table(postgres, name, ROWS)
    settings = settings_with(tmp_path, fake, name)
    synced_all(settings, name, instance)
    registry = Generations(engine_for(postgres), name)
    live = registry.all()[0]
    before = {k: v for k, v in live.pipeline.items() if k != QDRANT_LEXICAL}
    identity = {k: v for k, v in before.items() if k not in ("embedder", "embedder_name")}
    with engine_for(postgres).begin() as conn:  # what the version before registered
        registry.set_pipeline(conn, live.number, pipeline_key(identity), before)
    assert plan_report(settings, name)["generation"] == "1 (live)"
    synced_all(settings, name, instance)
    (only,) = registry.all()
    assert only.number == 1 and only.pipeline[QDRANT_LEXICAL] == "simple"


def test_the_full_text_follows_every_write_and_the_readers_view(synced, postgres, instance):
    settings, name = synced
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"UPDATE {name} SET body = 'now says QQV-77' WHERE id = 5"))
    sync_shards(settings, name, instance)
    hits = search_source(settings, name, "qqv-77", 3, "pgvector", mode="lexical")
    assert [h["row_id"] for h in hits] == ["5"]
    runtime = runtime_for(settings, name, postgres, "live", register=False)
    schema, view = runtime.stable_table
    with engine_for(postgres).connect() as conn:
        found = conn.scalar(
            sa.text(
                f'SELECT row_id FROM "{schema}"."{view}" '
                "WHERE lexical @@ to_tsquery('simple', 'qqv')"
            )
        )
    assert found == "5"


def test_a_language_edit_recomputes_the_column_and_hybrid_false_drops_it_with_no_embedding(
    synced, postgres, fake, tmp_path, instance
) -> None:
    settings, name = synced
    embedded = len(fake.requests)
    english = settings_with(tmp_path, fake, name, hybrid="{language: english}")
    # Qdrant's terms are in the collection: another language is another generation, built
    # beside the live one, which keeps answering in its own language until the switch.
    sync_source(english, name, "00", instance)
    assert generation_states(postgres, name) == {1: "live", 2: "building"}
    assert search_source(english, name, "fails", 3, "qdrant", mode="lexical")[0]["row_id"] == "17"
    synced_all(english, name, instance)
    assert generation_states(postgres, name) == {1: "previous", 2: "live"}
    # English stems: "fails" finds "failing" now, in both sinks.
    for backend in ("pgvector", "qdrant"):
        hits = search_source(english, name, "failing", 3, backend, mode="lexical")
        assert [h["row_id"] for h in hits] == ["17"], backend
    off = settings_with(tmp_path, fake, name, hybrid="false")
    sync_shards(off, name, instance)
    assert len(fake.requests) == embedded  # nothing was embedded again
    from click import ClickException

    with pytest.raises(ClickException, match="full-text column"):
        search_source(off, name, "ZXQ-4821", 3, "pgvector", mode="hybrid")
    assert search_source(off, name, "ZXQ-4821", 3, "pgvector")  # dense by default
    with pytest.raises(Exception, match="'klingon' is not a language Qdrant's BM25 knows"):
        settings_with(tmp_path, fake, name, hybrid="{language: klingon}")
    bad = settings_with(tmp_path, fake, name, hybrid="{language: klingon}", qdrant="false")
    with pytest.raises(Exception, match="not a text search configuration.*english"):
        sync_shards(bad, name, instance)


def test_evaluate_reports_each_backend_and_mode_on_labelled_queries(synced, tmp_path) -> None:
    import json

    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    settings, name = synced
    queries = tmp_path / "queries.jsonl"
    queries.write_text(
        json.dumps({"query": "ZXQ-4821", "relevant": ["17"]})
        + "\n"
        + json.dumps({"query": "widget number 3", "relevant": [3]})
        + "\n"
    )
    run = CliRunner().invoke(
        main,
        ["--sources", str(settings.path), "evaluate", "--source", name]
        + ["--queries", str(queries), "--k", "5", "--json"],
    )
    assert run.exit_code == 0, run.output
    report = json.loads(run.output)
    assert report["queries"] == 2 and report["k"] == 5
    by = {(r["backend"], r["mode"]): r for r in report["results"]}
    assert set(by) == {(b, m) for b in ("pgvector", "qdrant") for m in MODES}
    for backend in ("pgvector", "qdrant"):
        assert by[(backend, "lexical")]["mrr_at_k"] == 1.0  # both found first by their words
        assert by[(backend, "hybrid")]["mrr_at_k"] >= by[(backend, "dense")]["mrr_at_k"]
    for result in by.values():
        assert 0 <= result["ndcg_at_k"] <= 1 and 0 <= result["recall_at_k"] <= 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "x"}\n')
    refused = CliRunner().invoke(
        main, ["--sources", str(settings.path), "evaluate", "--queries", str(bad)]
    )
    assert refused.exit_code == 1 and "bad.jsonl:1" in refused.output


def test_known_item_queries_are_made_from_the_rows_and_evaluate_reads_them(
    synced, tmp_path
) -> None:
    import json

    from click.testing import CliRunner

    from embedding_assets.cli.main import main

    settings, name = synced
    out = tmp_path / "known.jsonl"
    made = CliRunner().invoke(
        main,
        ["--sources", str(settings.path), "evaluate", "--source", name]
        + ["--make-queries", "30", "--out", str(out)],
    )
    assert made.exit_code == 0, made.output
    queries = [json.loads(line) for line in out.read_text().splitlines()]
    names = [q for q in queries if q["kind"] == "name"]
    words = [q for q in queries if q["kind"] == "words"]
    assert len(names) == 30 and len(words) == 30  # every row: a name and words
    titles = {str(r["id"]): r["title"] for r in ROWS}
    assert all(q["query"] == titles[q["relevant"][0]] for q in names)  # the first column
    (gadget,) = [q for q in words if q["relevant"] == ["17"]]
    # Its rarest words: ones no other row has (every word of the widgets is shared).
    others = " ".join(f"{r['title']}: {r['body']}".lower() for r in ROWS if r["id"] != 17)
    assert len(gadget["query"].split()) == 4
    assert not [w for w in gadget["query"].split() if w in others.split()], gadget
    run = CliRunner().invoke(
        main,
        ["--sources", str(settings.path), "evaluate", "--source", name]
        + ["--queries", str(out), "--json"],
    )
    assert run.exit_code == 0, run.output
    assert json.loads(run.output)["queries"] == 60
