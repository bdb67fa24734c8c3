"""Generations without services: what makes a new one, picking one, names, token budgets,
and the one capture trigger every generation agrees on."""

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from embedding_assets.config.settings import Settings
from embedding_assets.core.delta import CHUNK_COLUMNS, ChunkedRows, PendingRows
from embedding_assets.destinations.pg_relations import POSTGRES_NAME_LIMIT, relation_name
from embedding_assets.state.generations import Generation
from embedding_assets.state.triggers import CaptureTriggers
from embedding_assets.sync.embed import fit_token_budget, new_chunks, new_tokens
from embedding_assets.sync.generations import config_key, generation_spec, pick


def settings(**source) -> Settings:
    return Settings.model_validate(
        {
            "embedders": {
                "local": {"provider": "sentence_transformers"},
                "remote": {
                    "provider": "openai",
                    "model": "m",
                    "base_urls": ["http://127.0.0.1:9/v1"],
                },
            },
            "sources": [{"name": "docs", "table": "docs", "text": "{title}", **source}],
        }
    )


def key_of(**source) -> str:
    s = settings(**source)
    spec = s.source("docs")
    return config_key(spec, s.embedder_for(spec), f"model:{spec.embedder}")


def test_only_what_changes_vectors_makes_a_new_generation():
    base = key_of()
    same = [
        key_of(metadata=["category"]),
        key_of(where="not archived"),
        key_of(max_rows_per_run=5, shards=4),
        key_of(generations={"promote": "manual"}),
    ]
    assert all(k == base for k in same)
    different = [
        key_of(text="{title} {body}"),
        key_of(chunking={"max_tokens": 128, "overlap": 8}),
        key_of(embedder="remote"),
    ]
    assert len({base, *different}) == 4


def test_the_requested_output_dimension_is_part_of_the_pipeline():
    s = settings(embedder="remote")
    spec = s.source("docs")
    plain = config_key(spec, s.embedder_for(spec), "openai:m")
    smaller = s.embedder_for(spec).model_copy(update={"dimensions": 256})
    assert config_key(spec, smaller, "openai:m") != plain


def generation(number: int, state: str, text: str = "{title}") -> Generation:
    return Generation(
        source="docs", number=number, target=f"public.docs_embeddings__g{number}",
        pg_table=f"public.docs_embeddings__g{number}", collection=f"docs__g{number}",
        pipeline_key=str(number),
        pipeline={"text": text, "chunking": {"max_tokens": 64, "overlap": 8}},
        model="m", state=state, promote="auto", created_at=datetime.now(UTC),
        promoted_at=None, retired_at=None, dropped_at=None, blocked_reason=None,
        blocked_at=None,
    )  # fmt: skip


def test_pick_prefers_the_build_then_live_and_never_a_dropped_one():
    both = [generation(1, "previous"), generation(2, "live"), generation(3, "building")]
    assert pick(both, None).number == 3
    assert pick(both, "live").number == 2
    assert pick(both, 1).state == "previous"
    assert pick([generation(1, "dropped"), generation(2, "live")], None).number == 2
    from embedding_assets.state.generations import GenerationError

    with pytest.raises(GenerationError, match="no generation 9"):
        pick(both, 9)


def test_a_generation_syncs_with_its_own_table_template_and_chunking():
    spec = settings(metadata=["category"]).source("docs")
    gen = generation(2, "building", text="{title}: {body}")
    own = generation_spec(spec, gen)
    assert own.pg_table == ("public", "docs_embeddings__g2")
    assert own.qdrant_collection == "docs__g2"
    assert own.text == "{title}: {body}" and own.metadata == ["category"]


def test_long_names_stay_within_postgres_limit_and_apart():
    table = "t" * 57
    one, two = (relation_name(f"{table}__g{n}", "_embedding_hnsw") for n in (1, 2))
    assert len(one) <= POSTGRES_NAME_LIMIT and len(two) <= POSTGRES_NAME_LIMIT
    assert one != two and one.endswith("_embedding_hnsw")
    assert relation_name("docs", "_shard") == "docs_shard"  # short names unchanged


def test_every_generation_writes_the_same_capture_trigger():
    """Generations of one source share one trigger: each runtime must produce it byte for
    byte, or they would reinstall it back and forth."""
    columns = ("id", "title", "body", "category", "summary")
    first = settings(text="{title}: {body}", metadata=["category"]).source("docs")
    second = settings(text="{summary}", metadata=["category"]).source("docs")
    watched = ("body", "summary", "title")
    a = CaptureTriggers(first, columns, watched)
    b = CaptureTriggers(second, columns, watched)
    assert a.body_signature == b.body_signature
    assert a.watched_columns == ["body", "category", "id", "summary", "title"]
    assert "FROM embedding_assets.generations" in a.function_sql()


def budget_chunks(rows: list[tuple[str, list[tuple[str, int]]]]) -> ChunkedRows:
    """rows: (row id, [(chunk text, tokens)])."""
    frame = pd.DataFrame({"row_id": [r for r, _ in rows], "content_hash": "h"})
    pending = PendingRows(
        "docs", 0, "v", datetime.now(UTC), frame, ["gone"], False,
        consumed=[(i, r) for i, (r, _) in enumerate(rows)] + [(99, "gone")],
        watermark="2026-12-01",
    )  # fmt: skip
    records = [
        (row_id, index, text, tokens, f"h-{text}")
        for row_id, chunks in rows
        for index, (text, tokens) in enumerate(chunks)
    ]
    return ChunkedRows(pending, pd.DataFrame(records, columns=CHUNK_COLUMNS))


def test_a_token_budget_takes_rows_in_order_and_leaves_the_rest_pending():
    chunked = budget_chunks(
        [
            ("a", [("x", 40)]),
            ("b", [("reused", 500)]),  # needs no new token
            ("c", [("y", 40), ("z", 30)]),
            ("d", [("w", 10)]),  # would fit, but rows are taken in order
        ]
    )
    stored = {"h-reused": np.ones(3, dtype=np.float32)}
    kept, deferred = fit_token_budget(chunked, stored, 3, tokens_left=60)
    assert deferred == ["c", "d"]
    assert kept.pending.rows["row_id"].tolist() == ["a", "b"]
    assert sorted(kept.chunks["text"]) == ["reused", "x"]
    # Their feed entries stay for a later run; the deleted row goes through; the watermark
    # does not move past rows that were not taken.
    assert [r for _, r in kept.pending.consumed] == ["a", "b", "gone"]
    assert kept.pending.deleted == ["gone"] and kept.pending.watermark is None
    assert kept.pending.backlog
    untouched, none = fit_token_budget(chunked, stored, 3, tokens_left=10_000)
    assert none == [] and untouched is chunked


def test_new_tokens_count_each_new_text_once():
    chunked = budget_chunks([("a", [("x", 7), ("x", 7), ("y", 5)])])
    missing = new_chunks(chunked.chunks, {}, 3)
    assert len(missing) == 2 and new_tokens(chunked.chunks, missing) == 12
