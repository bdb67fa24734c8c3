"""A run's memory does not grow with the table: a source eight times larger than one
batch (`max_rows_per_run`) is synced batch after batch, and the Python heap's peak during
the sync (tracemalloc: numpy and pandas buffers included) stays that of one batch, not of
the table. Real Postgres + pgvector, Qdrant's embedded engine, an OpenAI-compatible server
on 127.0.0.1."""

import tracemalloc

from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import load_settings
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    unique_name,
)

BATCH = 400  # max_rows_per_run: rows per shard per run
BODY = "x" * 1500  # ~1.5 kB of text per row, so the table's size shows in the heap


def synced_peak_mb(postgres, tmp_path, instance, fake, rows: int) -> tuple[float, int]:
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"t{i}", "body": f"{i} {BODY}"} for i in range(rows)]
    )
    path = fake_embedder_settings(
        tmp_path, name, fake.base_url, {}, {"shards": "2", "max_rows_per_run": str(BATCH)}
    )
    settings = load_settings(path)
    tracemalloc.start()
    try:
        reports = sync_source(settings, name, None, instance, every_shard=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert all(r.success for r in reports)
    return peak / 2**20, sum(r.rows for r in reports)


def test_a_table_eight_batches_large_peaks_like_one_batch(postgres, home, tmp_path, instance, fake):
    one_batch, synced_small = synced_peak_mb(postgres, tmp_path, instance, fake, 2 * BATCH)
    eight_batches, synced_large = synced_peak_mb(postgres, tmp_path, instance, fake, 16 * BATCH)
    assert (synced_small, synced_large) == (2 * BATCH, 16 * BATCH)
    # The large table's text alone is ~9.6 MB more than the small one's; holding it (or its
    # chunks) at once would add at least that much to the peak.
    assert eight_batches < one_batch + 4, (one_batch, eight_batches)
