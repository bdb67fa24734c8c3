"""A third-party OpenAI-compatible server, infinity-emb, serving the bundled model folder offline
from its own environment (scripts/install-infinity.sh): its answers have OpenAI's shape and its
vectors equal the in-process model's, so the `openai` provider can point at it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
from embedding_assets.ops.demo import read_demo_rows
from embedding_assets_tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.infinity]

ROOT = Path(__file__).resolve().parents[3]
INFINITY = ROOT / ".venv-infinity" / "bin" / "infinity_emb"
NAME = "all-MiniLM-L6-v2"
STARTUP_TIMEOUT_S = 120  # ~10 s here; its imports are slow on a busy 2-core machine


@pytest.fixture(scope="module")
def reference() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="module")
def infinity(reference: SentenceTransformerEmbedder) -> Iterator[str]:
    if not INFINITY.exists():
        pytest.skip(f"{INFINITY} is missing: run scripts/install-infinity.sh to create it")
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # No usage statistics (its posthog client would only time out here anyway).
        "DO_NOT_TRACK": "1",
        "INFINITY_ANONYMOUS_USAGE_STATS": "0",
    }
    cmd = [str(INFINITY), "v2", "--model-id", str(reference.model_dir), "--served-model-name",
           NAME, "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--engine",
           "torch", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"infinity exited early:\n{proc.stdout.read().decode()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"infinity not healthy in {STARTUP_TIMEOUT_S} s"
                time.sleep(0.25)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    # infinity serves /embeddings (no /v1 unless started with --url-prefix /v1).
    req = urllib.request.Request(
        f"{url}/embeddings", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200
        return json.load(resp)


def test_infinity_answers_in_openai_shape(infinity: str) -> None:
    body = _post(infinity, {"model": NAME, "input": "hello world"})
    # OpenAI's keys; infinity adds "id" and "created".
    assert {"object", "data", "model", "usage"} <= set(body)
    assert body["object"] == "list" and body["model"] == NAME
    (item,) = body["data"]
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    assert {"prompt_tokens", "total_tokens"} <= set(body["usage"])

    body = _post(infinity, {"model": NAME, "input": ["a", "b", "c"], "encoding_format": "base64"})
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    assert all(
        np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4").shape == (384,)
        for d in body["data"]
    )


def test_infinity_vectors_match_the_in_process_model(
    infinity: str, reference: SentenceTransformerEmbedder
) -> None:
    texts = [f"{name}: {summary}" for name, _, _, summary in read_demo_rows(limit=48)]
    body = _post(infinity, {"model": NAME, "input": texts})
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    want = reference.embed_documents(texts)
    assert got.shape == want.shape
    cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1)
    assert float(cosine.min()) >= 0.999


def test_openai_provider_syncs_a_source_through_infinity(
    infinity: str, reference: SentenceTransformerEmbedder, postgres, home, tmp_path
) -> None:
    """The `openai` provider end to end against a third-party OpenAI-compatible server."""
    import dagster as dg

    from embedding_assets.cli.search import search_source
    from embedding_assets.config.settings import load_settings
    from embedding_assets.sync.generations import runtime_for
    from embedding_assets_tests.integration.helpers import (
        create_docs_table,
        sync_shards,
        unique_name,
    )

    name = unique_name()
    rows = [{"id": i, "title": f"Lib {i}", "body": f"reads file type {i}"} for i in range(1, 21)]
    create_docs_table(postgres, name, rows)
    path = tmp_path / "infinity.yaml"
    path.write_text(
        "embedders:\n"
        f"  infinity: {{provider: openai, model: {NAME}, base_urls: ['{infinity}']}}\n"
        f"sources: [{{name: {name}, table: {name}, text: '{{title}}: {{body}}', "
        "embedder: infinity, shards: 2}]\n"
    )
    settings = load_settings(path)
    with dg.DagsterInstance.ephemeral() as instance:
        results = sync_shards(settings, name, instance)
    assert all(r.success for r in results.values())
    store = runtime_for(settings, name, postgres)
    stored = [store.pgvector.stored_chunks(shard) for shard in (0, 1)]
    got = np.stack([v for frame in stored for v in frame["embedding"]])
    texts = [t for frame in stored for t in frame["chunk_text"]]
    assert len(texts) == 20
    cosine = np.sum(got * reference.embed_documents(texts), axis=1)
    assert float(cosine.min()) >= 0.999
    hits = search_source(settings, name, "Lib 12: reads file type 12", 3, "pgvector")
    assert hits[0]["row_id"] == "12"
