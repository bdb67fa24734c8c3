"""A source synced through `embedding-assets serve` with the `openai` provider, including a
worker killed and restarted in the middle of a run: the run retries and converges."""

import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import dagster as dg
import numpy as np
import pytest

from embedding_assets.config.settings import load_settings
from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.conftest import free_port
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    materialization_metadata,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration


class Worker:
    def __init__(self, port: int, *options: str):
        self.port = port
        self.options = options
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "embedding_assets.cli", "serve", "--port", str(self.port)]
            + list(self.options),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.health():
                return
            time.sleep(0.3)
        raise AssertionError("worker did not become healthy")

    def health(self) -> dict | None:
        import json

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    worker = Worker(free_port())
    worker.start()
    yield worker
    worker.stop()


def worker_settings(tmp_path, name: str, port: int, model: str = "all-MiniLM-L6-v2"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            embedders:
              worker:
                provider: openai
                model: {model}
                base_urls: ["http://127.0.0.1:{port}/v1"]
                max_inputs_per_request: 8
                timeout_seconds: 10
                max_attempts: 12
                batch_deadline_seconds: 180
            sources:
              - name: {name}
                table: {name}
                text: "{{title}}: {{body}}"
                metadata: [category]
                embedder: worker
                shards: 1
            """
        )
    )
    return load_settings(path)


def test_sync_through_the_worker_matches_in_process_vectors(postgres, home, tmp_path, worker):
    name = unique_name()
    rows = [{"id": i, "title": f"Crate {i}", "body": f"parses format {i}"} for i in range(1, 31)]
    create_docs_table(postgres, name, rows)
    settings = worker_settings(tmp_path, name, worker.port)
    with dg.DagsterInstance.ephemeral() as instance:
        result = sync_shards(settings, name, instance)["00"]
    assert result.success
    meta = materialization_metadata(result, "embeddings")
    assert meta["embedded_chunks"] == 30
    assert meta["embedder_requests"] >= 4  # 8 inputs per request
    stored = runtime_for(settings, name, postgres).pgvector.stored_chunks(0)
    local = SentenceTransformerEmbedder().embed_documents(
        [f"Crate {r}: parses format {r}" for r in stored["row_id"]]
    )
    cosine = np.sum(np.stack(stored["embedding"]) * local, axis=1)
    assert cosine.min() >= 0.999


def test_worker_killed_and_restarted_mid_run_converges(postgres, home, tmp_path, worker):
    name = unique_name()
    rows = [
        {"id": i, "title": f"Package {i}", "body": " ".join(f"word{i}x{j}" for j in range(40))}
        for i in range(1, 401)
    ]
    create_docs_table(postgres, name, rows)
    settings = worker_settings(tmp_path, name, worker.port)
    requests_before = worker.health()["requests"]
    restarted = threading.Event()

    def kill_then_restart() -> None:
        # Kill as soon as this run's requests reach the worker, then bring it back.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            health = worker.health()
            if health and health["requests"] >= requests_before + 3:
                break
            time.sleep(0.05)
        worker.kill()
        time.sleep(2)
        worker.start()
        restarted.set()

    chaos = threading.Thread(target=kill_then_restart, daemon=True)
    chaos.start()
    with dg.DagsterInstance.ephemeral() as instance:
        result = sync_shards(settings, name, instance)["00"]
    chaos.join(timeout=180)
    assert restarted.is_set()
    assert result.success
    meta = materialization_metadata(result, "embeddings")
    assert meta["embedder_retries"] >= 1
    assert meta["embedded_chunks"] == 400
    work = runtime_for(settings, name, postgres).exact_work()[0]
    assert (work.eligible_rows, work.embedded_rows, work.pending_rows) == (400, 400, 0)
    assert work.qdrant_lag_rows == 0


def test_bfloat16_worker_serves_only_its_own_model_name(postgres, home, tmp_path):
    bf16 = Worker(free_port(), "--precision", "bfloat16")
    bf16.start()
    try:
        assert bf16.health()["model_id"].endswith("@bf16")
        name = unique_name()
        rows = [{"id": i, "title": f"Tool {i}", "body": f"formats {i}"} for i in range(1, 11)]
        create_docs_table(postgres, name, rows)
        settings = worker_settings(tmp_path, name, bf16.port, model="all-MiniLM-L6-v2@bf16")
        with dg.DagsterInstance.ephemeral() as instance:
            assert sync_shards(settings, name, instance)["00"].success
            store = runtime_for(settings, name, postgres)
            assert store.model_id == "openai:all-MiniLM-L6-v2@bf16"
            assert store.exact_work()[0].embedded_rows == 10
            # A client configured for the float32 model is refused, not fed bf16 vectors.
            other = unique_name()
            create_docs_table(postgres, other, rows)
            fp32 = worker_settings(tmp_path, other, bf16.port)
            result = sync_shards(fp32, other, instance, raise_on_error=False)["00"]
            assert not result.success
    finally:
        bf16.stop()
