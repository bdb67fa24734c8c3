"""Search finds what is there: after one large row adds thousands of near-duplicate chunks,
each small row is still found first by both backends when queried with its own stored
vector, through pgvector's HNSW index (built after the bulk load) and through Qdrant; the
recall check measures the index against exact search. Real local model."""

import json

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedding_assets.cli.main import main
from embedding_assets.destinations.recall import pgvector_recall, recall_at_k
from embedding_assets.state.db import engine_for
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    sync_shards,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration

SMALL = {
    2: ("Invoice overdue", "account 1234 owes 56 euros since March"),
    3: ("Headphones", "wireless battery lasts thirty hours"),
    4: ("Sourdough", "feed the starter twice a day"),
    5: ("Kernel panic", "after upgrading the graphics driver"),
    6: ("Tide tables", "low water at 06:12 in Brest"),
}


def test_exact_matches_found_among_thousands_of_near_duplicates(postgres, home, tmp_path):
    name = unique_name()
    big = " ".join(
        f"The parser version {i} reads the config file and logs a warning." for i in range(2400)
    )
    rows = [{"id": 1, "title": "Release notes", "body": big}]
    rows += [{"id": i, "title": t, "body": b} for i, (t, b) in SMALL.items()]
    create_docs_table(postgres, name, rows)
    settings = write_settings(
        tmp_path, name, name, shards="1", chunking="{max_tokens: 16, overlap: 0}"
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = sync_shards(settings, name, instance)["00"]
    assert result.success
    runtime = runtime_for(settings, name, postgres)
    assert runtime.ledger.record().vector_index == "built"
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(sa.text(f"SELECT count(*) FROM {runtime.pgvector.table}")) > 2000
    small = runtime.pgvector.stored_chunks(0)
    small = small[small["row_id"] != "1"]
    assert len(small) == len(SMALL)
    for row in small.itertuples(index=False):
        pg = runtime.pgvector.search(row.embedding, 10)
        assert pg[0].row_id == row.row_id and pg[0].score > 0.999
        qd = runtime.qdrant.search(row.embedding, 10, 0)
        assert qd[0].payload["row_id"] == row.row_id

    # The index measured against exact search, on chunks of the big row (the hard case).
    big_vectors = list(runtime.pgvector.stored_chunks(0).query("row_id == '1'")["embedding"][:20])
    measured = pgvector_recall(runtime, 0, big_vectors)
    assert not measured.exact_engine and measured.recall >= 0.95
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    recall = checks["search_recall"]
    assert recall.passed and recall.metadata["pgvector_exact"].value is False
    assert recall.metadata["pgvector_recall"].value >= 0.95
    assert recall.metadata["qdrant_exact"].value is True  # the embedded engine

    out = CliRunner().invoke(
        main,
        ["--sources", str(settings.path), "search", "Tide tables: low water at 06:12 in Brest",
         "--exact", "--json"],
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["row_id"] == "6"


def test_recall_at_k_counts_the_exact_neighbours_found():
    # The approximate search missed the exact third neighbour (0.7) and returned a worse one.
    assert recall_at_k([[0.9, 0.8, 0.5]], [[0.9, 0.8, 0.7]], k=3) == pytest.approx(0.6667)
    # A different neighbour with the same score as the exact k-th is as good.
    assert recall_at_k([[0.9, 0.8]], [[0.9, 0.8]], k=2) == 1.0
    assert recall_at_k([[1.0], [0.2]], [[1.0], [0.3]], k=1) == 0.5
    assert recall_at_k([[]], [[]]) is None
