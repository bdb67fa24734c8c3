"""Sharding, ids and the embed stage's reuse logic, without services."""

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from embedding_assets.core.delta import CHUNK_COLUMNS, ChunkedRows, PendingRows
from embedding_assets.core.ids import point_id
from embedding_assets.core.sharding import shard_index, shard_of
from embedding_assets.sync.embed import embed_chunks


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
    from embedding_assets.defs.sensors import retry_wait

    assert [retry_wait(n) for n in (1, 2, 3, 4)] == [60, 120, 240, 480]
    assert retry_wait(30) == 3600


def test_pieces_are_even_and_written_while_the_next_is_embedded(monkeypatch):
    import threading
    import time

    import embedding_assets.sync.embed as pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_CHUNKS", 4)
    embedder = CountingEmbedder()
    writes: list[tuple[list[str], int, int]] = []
    writing = threading.Event()
    overlapped = []

    def progress(hashes, vectors, done, total):
        writing.set()
        time.sleep(0.05)  # a slow write: the next piece is embedded meanwhile
        writes.append((hashes, done, total))
        writing.clear()

    original = embedder.embed_documents

    def embed(texts):
        overlapped.append(writing.is_set())
        return original(texts)

    embedder.embed_documents = embed
    texts = [f"t{i}" for i in range(9)]  # 9 over pieces of 4: three pieces of 3
    result = embed_chunks(chunked(texts), embedder, {}, progress)
    assert [len(call) for call in embedder.calls] == [3, 3, 3]
    assert [(done, total) for _, done, total in writes] == [(3, 9), (6, 9), (9, 9)]
    assert [h for hashes, _, _ in writes for h in hashes] == [f"h-{t}" for t in texts]
    assert True in overlapped[1:]  # a piece was embedded while the previous one was written
    plain = embed_chunks(chunked(texts), CountingEmbedder(), {})
    np.testing.assert_array_equal(result.vectors, plain.vectors)


def test_a_failed_progress_write_stops_the_embedding(monkeypatch):
    import pytest

    import embedding_assets.sync.embed as pipeline

    monkeypatch.setattr(pipeline, "PROGRESS_CHUNKS", 2)
    embedder = CountingEmbedder()

    def progress(*_):
        raise OSError("vector cache unreachable")

    with pytest.raises(OSError, match="vector cache unreachable"):
        embed_chunks(chunked([f"t{i}" for i in range(8)]), embedder, {}, progress)
    assert len(embedder.calls) <= 3  # stopped at the next piece, not after all four


def test_row_vector_is_the_renormalised_mean_or_the_first_chunk():
    from embedding_assets.core.row_vectors import row_vectors

    vectors = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0]], dtype=np.float32)
    # Row "b" has chunks 1 and 0 (out of order); "a" one chunk; "c" two opposite chunks.
    ids, indexes = ["b", "a", "b", "c", "c"], [1, 0, 0, 0, 1]
    rows = np.array([vectors[0], vectors[2], vectors[3], vectors[1], -vectors[1]])
    mean = row_vectors(ids, indexes, rows)
    np.testing.assert_allclose(mean["a"], [0, 0, 1])
    expected = (vectors[0] + vectors[3]) / np.linalg.norm(vectors[0] + vectors[3])
    np.testing.assert_allclose(mean["b"], expected, rtol=1e-6)
    assert np.linalg.norm(mean["b"]) == pytest.approx(1.0)
    np.testing.assert_allclose(mean["c"], [0, 0, 0])  # cancelled out: no direction to keep
    first = row_vectors(ids, indexes, rows, "first_chunk")
    np.testing.assert_allclose(first["b"], vectors[3])  # chunk 0, wherever it comes
    assert set(first) == {"a", "b", "c"}
