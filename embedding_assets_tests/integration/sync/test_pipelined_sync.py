"""The pipelined embedding path (pieces written to the vector cache while the model embeds
the next piece) stores the vectors of the plain path, and a source larger than
`max_rows_per_run` is synced in runs that each hold at most that many rows. Real embedded
Postgres + pgvector, Qdrant's embedded engine and the bundled all-MiniLM-L6-v2."""

import dagster as dg
import numpy as np
import pytest
import sqlalchemy as sa

import embedding_assets.sync.embed as pipeline
from embedding_assets.cli.sync import sync_source
from embedding_assets.ops.demo import read_demo_rows
from embedding_assets.state.db import engine_for
from embedding_assets.state.vector_cache import VectorCache
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    unique_name,
    write_settings,
)
from embedding_assets_tests.integration.sync.test_large_rows import cached

pytestmark = pytest.mark.integration

ROWS = 240
MAX_ROWS_PER_RUN = 100


def stored_vectors(url: str, table: str) -> dict[str, np.ndarray]:
    with engine_for(url).connect() as conn:
        rows = conn.execute(sa.text(f"SELECT chunk_text, embedding FROM {table}"))
        return {r.chunk_text: r.embedding.to_numpy().astype(np.float32) for r in rows}


def test_pipelined_sync_stores_the_plain_vectors_in_bounded_runs(
    postgres, home, tmp_path, monkeypatch
):
    demo = read_demo_rows(limit=ROWS)
    rows = [
        {"id": i, "title": name, "body": summary or "-"}
        for i, (name, _, _, summary) in enumerate(demo)
    ]
    pipelined, plain = unique_name("piped"), unique_name("plain")
    for name in (pipelined, plain):
        create_docs_table(postgres, name, rows)
    options = {"shards": "1", "max_rows_per_run": str(MAX_ROWS_PER_RUN)}

    monkeypatch.setattr(pipeline, "PROGRESS_CHUNKS", 16)  # many pieces per run
    saved: list[int] = []
    save = VectorCache.save

    def counted_save(self, hashes, vectors):
        saved.append(len(hashes))
        return save(self, hashes, vectors)

    monkeypatch.setattr(VectorCache, "save", counted_save)
    settings = write_settings(tmp_path, pipelined, pipelined, **options)
    with dg.DagsterInstance.ephemeral() as instance:
        reports = sync_source(settings, pipelined, None, instance)
    # More rows than one run may hold: several runs, none over the limit, all rows stored.
    assert len(reports) >= 3 and all(r.success for r in reports)
    assert max(r.rows for r in reports) <= MAX_ROWS_PER_RUN
    assert sum(r.rows for r in reports) == ROWS
    piped_runtime = runtime_for(settings, pipelined, postgres)
    assert len(saved) >= 12 and sum(saved) >= ROWS  # pieces were written along the way
    assert cached(postgres, piped_runtime.target) == 0  # the stored pieces were forgotten

    # The plain path: one piece per run, nothing written before the store.
    monkeypatch.setattr(pipeline, "PROGRESS_CHUNKS", 10**9)
    saved.clear()
    plain_settings = write_settings(tmp_path, plain, plain, **options)
    with dg.DagsterInstance.ephemeral() as instance:
        assert all(r.success for r in sync_source(plain_settings, plain, None, instance))

    assert saved == []
    got = stored_vectors(postgres, piped_runtime.pgvector.table)
    want = stored_vectors(postgres, runtime_for(plain_settings, plain, postgres).pgvector.table)
    assert got.keys() == want.keys() and len(got) >= ROWS
    texts = list(want)
    cosines = (np.stack([got[t] for t in texts]) * np.stack([want[t] for t in texts])).sum(1)
    assert cosines.min() >= 0.99999
    # And both are what a bare encode of each chunk gives.
    model = piped_runtime.embedder.load()
    bare = model.encode(texts[:20], normalize_embeddings=True, show_progress_bar=False)
    assert (np.stack([got[t] for t in texts[:20]]) * bare).sum(1).min() >= 0.99999
