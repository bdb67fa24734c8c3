"""The inference worker run for real (`python -m embedding_assets.worker`) against the in-process
model: OpenAI's response and error shapes, request merging under concurrency, clean SIGTERM."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
from embedding_assets.ops.demo import read_demo_rows
from embedding_assets_tests.conftest import free_port

pytestmark = pytest.mark.integration

MODEL = "all-MiniLM-L6-v2"
STARTUP_TIMEOUT_S = 90


class WorkerProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "embedding_assets.worker", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    def wait_healthy(self) -> dict[str, Any]:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.proc.stdout.read()}")
            try:
                return self.health()
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"worker not healthy after {STARTUP_TIMEOUT_S} s")

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/health", timeout=5) as resp:
            return json.load(resp)

    def post(self, payload: Any, path: str = "/v1/embeddings") -> tuple[int, dict[str, Any]]:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.load(err)

    def embed(self, texts: str | list[str], **kw: Any) -> np.ndarray:
        status, body = self.post({"model": MODEL, "input": texts, **kw})
        assert status == 200, body
        return np.array([d["embedding"] for d in body["data"]], dtype=np.float32)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _start_pair() -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    # Both start at once (their imports overlap): one serves the tests, one is shut down.
    workers = (WorkerProcess(), WorkerProcess())
    try:
        yield workers
    finally:
        for w in workers:
            w.stop()


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[WorkerProcess, WorkerProcess]]:
    yield from _start_pair()


@pytest.fixture(scope="module")
def worker(workers: tuple[WorkerProcess, WorkerProcess]) -> WorkerProcess:
    workers[0].wait_healthy()
    return workers[0]


@pytest.fixture(scope="module")
def reference() -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder()


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [f"{name}: {summary}" for name, _, _, summary in read_demo_rows(limit=160)]


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.min(np.sum(a * b, axis=1)))  # rows are L2-normalized


def test_health_and_models(worker: WorkerProcess) -> None:
    health = worker.health()
    assert health["status"] == "ok"
    assert health["model"] == MODEL
    assert health["model_id"] == f"sentence_transformers:{MODEL}"
    assert health["dimension"] == 384
    assert {"requests", "batches", "inputs"} <= health.keys()
    with urllib.request.urlopen(f"{worker.url}/v1/models", timeout=5) as resp:
        models = json.load(resp)
    ids = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and ids[0] == MODEL
    assert f"sentence-transformers/{MODEL}" in ids


def test_response_shape_for_str_and_list(
    worker: WorkerProcess, reference: SentenceTransformerEmbedder
) -> None:
    status, body = worker.post({"model": MODEL, "input": "hello world", "user": "ignored"})
    assert status == 200
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list" and body["model"] == MODEL
    (item,) = body["data"]
    assert set(item) == {"object", "index", "embedding"}
    assert item["object"] == "embedding" and item["index"] == 0
    assert len(item["embedding"]) == 384
    assert body["usage"] == {"prompt_tokens": 2, "total_tokens": 2}  # "hello", "world"

    inputs = ["one", "two words", "and three words"]
    # An alias is accepted; the canonical name is echoed, as OpenAI echoes its model name.
    status, body = worker.post({"model": f"sentence-transformers/{MODEL}", "input": inputs})
    assert status == 200 and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1, 2]
    tokens = sum(reference.tokenizer.count(t) for t in inputs)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    # Same answer without the /v1 prefix.
    status, plain = worker.post({"model": MODEL, "input": inputs}, path="/embeddings")
    assert status == 200 and plain["data"] == body["data"]


def test_base64_decodes_to_the_float_vectors(worker: WorkerProcess, texts: list[str]) -> None:
    floats = worker.embed(texts[:5])
    status, body = worker.post({"model": MODEL, "input": texts[:5], "encoding_format": "base64"})
    assert status == 200
    # What the openai client does with encoding_format="base64".
    decoded = np.array(
        [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    )
    np.testing.assert_array_equal(decoded, floats)


def test_vectors_match_the_in_process_model(
    worker: WorkerProcess, reference: SentenceTransformerEmbedder, texts: list[str]
) -> None:
    remote = worker.embed(texts[:64])
    assert _min_cosine(remote, reference.embed_documents(texts[:64])) >= 0.999
    assert _min_cosine(worker.embed([texts[0]]), reference.embed_query(texts[0])[None]) >= 0.999


def test_concurrent_requests_are_merged_and_answered_in_order(
    worker: WorkerProcess, reference: SentenceTransformerEmbedder, texts: list[str]
) -> None:
    groups = [texts[i * 8 : (i + 1) * 8] for i in range(16)]
    expected = reference.embed_documents(texts[:128])
    before = worker.health()
    barrier = threading.Barrier(len(groups))

    def call(group: list[str]) -> np.ndarray:
        barrier.wait()
        return worker.embed(group)

    with ThreadPoolExecutor(len(groups)) as pool:
        results = list(pool.map(call, groups))
    for i, got in enumerate(results):
        assert _min_cosine(got, expected[i * 8 : (i + 1) * 8]) >= 0.999, f"request {i}"
    after = worker.health()
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == 16 and after["inputs"] - before["inputs"] == 128
    assert batches < requests, f"{requests} requests ran in {batches} batches: none merged"


@pytest.mark.parametrize(
    ("payload", "status", "param", "code"),
    [
        pytest.param(b"{not json", 400, None, None, id="bad-json"),
        pytest.param([MODEL], 400, None, None, id="not-an-object"),
        pytest.param({"input": "x"}, 400, "model", None, id="no-model"),
        pytest.param({"model": "gpt-4", "input": "x"}, 404, "model", "model_not_found", id="model"),
        pytest.param({"model": MODEL, "input": []}, 400, "input", None, id="empty-list"),
        pytest.param({"model": MODEL, "input": ""}, 400, "input", None, id="empty-str"),
        pytest.param({"model": MODEL}, 400, "input", None, id="no-input"),
        pytest.param({"model": MODEL, "input": ["a", 7]}, 400, "input", None, id="int-item"),
        pytest.param({"model": MODEL, "input": [[101, 102]]}, 400, "input", None, id="token-ids"),
        pytest.param(
            {"model": MODEL, "input": "x", "dimensions": 256}, 400, "dimensions", None, id="dims"
        ),
        pytest.param(
            {"model": MODEL, "input": "x", "encoding_format": "int8"},
            400,
            "encoding_format",
            None,
            id="format",
        ),
        pytest.param({"model": MODEL, "input": ["a"] * 2049}, 413, "input", None, id="too-many"),
    ],
)
def test_errors_in_openai_shape(
    worker: WorkerProcess, payload: Any, status: int, param: str | None, code: str | None
) -> None:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    got, body = worker.post(data)
    assert got == status, body
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_dimensions_equal_to_the_model_dimension_is_accepted(worker: WorkerProcess) -> None:
    assert worker.embed("x", dimensions=384).shape == (1, 384)


def test_over_long_input_is_rejected_not_truncated(
    worker: WorkerProcess, reference: SentenceTransformerEmbedder, texts: list[str]
) -> None:
    long_text = " ".join(texts[:40])
    tokens = reference.tokenizer.count(long_text)
    assert tokens > reference.max_input_tokens
    status, body = worker.post({"model": MODEL, "input": ["fine", long_text]})
    assert status == 400
    assert body["error"]["message"] == (
        f"input 1 has {tokens} tokens, the model takes at most {reference.max_input_tokens}"
    )
    assert body["error"]["code"] == "context_length_exceeded"


def test_sigterm_finishes_in_flight_work_and_exits_cleanly(
    workers: tuple[WorkerProcess, WorkerProcess], texts: list[str]
) -> None:
    w = workers[1]
    w.wait_healthy()
    results: list[np.ndarray] = []
    big = threading.Thread(target=lambda: results.append(w.embed(texts[:160])))
    big.start()
    deadline = time.monotonic() + 10
    while w.health()["requests"] == 0:  # the request is in; now shut down under it
        assert time.monotonic() < deadline
        time.sleep(0.01)
    w.proc.send_signal(signal.SIGTERM)
    big.join(30)
    assert w.proc.wait(30) == 0
    assert results and results[0].shape == (160, 384)
    log = w.proc.stdout.read()
    assert "embedding worker ready" in log and "embedding worker stopped" in log
    assert "Traceback" not in log


def test_a_request_marked_live_is_counted_as_urgent(worker: WorkerProcess) -> None:
    from embedding_assets.embedders.remote_requests import LIVE_PRIORITY, PRIORITY_HEADER

    before = worker.health()["urgent_requests"]
    request = urllib.request.Request(
        worker.url + "/v1/embeddings",
        data=json.dumps({"model": MODEL, "input": ["a fresh change"]}).encode(),
        headers={"Content-Type": "application/json", PRIORITY_HEADER: LIVE_PRIORITY},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.status == 200
    worker.embed("a bulk request")  # no header: not urgent
    assert worker.health()["urgent_requests"] == before + 1
