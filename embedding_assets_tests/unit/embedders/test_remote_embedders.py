"""Remote embedders against a fake of each provider's wire format on 127.0.0.1.

Every behaviour (retries, Retry-After, splitting, bisection, failover, rate limits, key
hygiene) is shown against a real HTTP server; no real provider is contacted.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import numpy as np
import pytest

from embedding_assets.core.chunking import chunk_text
from embedding_assets.embedders.base import Embedder, HFTokenizer, InputFailure
from embedding_assets.embedders.providers import WIRE_FORMATS
from embedding_assets.embedders.remote import RemoteEmbedder
from embedding_assets.embedders.remote_errors import (
    EmbedderConfigError,
    EmbeddingFailed,
    parse_retry_after,
)
from embedding_assets.embedders.tokenizers import EstimatingTokenizer, tokenizer_for
from embedding_assets_tests.fakes.provider_server import (
    AUTH_PROVIDERS,
    Fault,
    ProviderServer,
    fake_vector,
    free_port,
)

PROVIDERS = sorted(WIRE_FORMATS)
DIM = 8
KEY = "sk-test-SECRET-0123456789abcdef"
TEXTS = [f"text number {i} about embeddings" for i in range(8)]


@pytest.fixture
def servers():
    started: list[ProviderServer] = []

    def start(provider: str, **kwargs) -> ProviderServer:
        server = ProviderServer(provider, dim=DIM, api_key=KEY, **kwargs).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def make(server: ProviderServer | list[str], provider: str | None = None, **kwargs):
    """An embedder for ``server`` with fast test timings; a unique name (own rate limits)."""
    urls = server if isinstance(server, list) else [server.base_url]
    provider = provider or server.provider
    options = {
        "wire": WIRE_FORMATS[provider],
        "model": "test-model",
        "base_urls": urls,
        "api_key": KEY,
        "dimension": DIM,
        "timeout_s": 2.0,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "tokenizer": EstimatingTokenizer(),
        "name": f"test-{uuid.uuid4().hex}",
    }
    options.update(kwargs)
    return RemoteEmbedder(**options)


def expected(texts, input_type="document"):
    return np.stack([fake_vector(t, DIM, input_type) for t in texts])


# -- happy paths ------------------------------------------------------------------------------

EXPECTED_BODIES = {
    "openai": {"model": "test-model", "input": ["a b", "c"], "encoding_format": "float"},
    "ollama": {"model": "test-model", "input": ["a b", "c"], "truncate": False},
    "cohere": {
        "model": "test-model",
        "texts": ["a b", "c"],
        "input_type": "search_document",
        "embedding_types": ["float"],
        "truncate": "NONE",
    },
    "voyage": {"model": "test-model", "input": ["a b", "c"], "input_type": "document"},
    "jina": {"model": "test-model", "input": ["a b", "c"], "task": "retrieval.passage"},
    "tei": {"inputs": ["a b", "c"], "normalize": True, "truncate": False},
}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_documents_and_query_shapes(servers, provider):
    server = servers(provider)
    embedder = make(server)
    assert isinstance(embedder, Embedder)
    vectors = embedder.embed_documents(["a b", "c"])
    assert vectors.dtype == np.float32 and vectors.shape == (2, DIM)
    np.testing.assert_allclose(vectors, expected(["a b", "c"]), rtol=1e-6)
    (request,) = server.requests
    assert request.body.items() >= EXPECTED_BODIES[provider].items()
    # The bearer key goes where the provider checks it (the fake answers 401 otherwise).
    assert request.authorization == f"Bearer {KEY}"

    query = embedder.embed_query("what is it")
    assert query.shape == (DIM,)
    if provider in ("cohere", "voyage", "jina"):  # services that embed queries differently
        assert server.requests[-1].input_type == "query"
        np.testing.assert_allclose(query, fake_vector("what is it", DIM, "query"), rtol=1e-6)
        assert not np.allclose(query, fake_vector("what is it", DIM, "document"))
    else:
        np.testing.assert_allclose(query, fake_vector("what is it", DIM), rtol=1e-6)
    assert embedder.embed_documents([]).shape == (0, DIM)


def test_openai_base64_and_dimensions_param(servers):
    server = servers("openai")
    embedder = make(server, encoding_format="base64", dimensions_param=DIM, dimension=None)
    assert embedder.model_id == f"openai:test-model@{DIM}d"
    assert embedder.dimension == DIM  # from `dimensions`, no probe request
    vectors = embedder.embed_documents(TEXTS)
    np.testing.assert_allclose(vectors, expected(TEXTS), rtol=1e-6)
    (request,) = server.requests
    assert request.body["encoding_format"] == "base64" and request.body["dimensions"] == DIM


def test_dimension_probe_once_and_cached(servers):
    server = servers("tei")
    embedder = make(server, dimension=None)
    assert embedder.dimension == DIM and embedder.dimension == DIM
    assert [r.inputs for r in server.requests] == [["dimension probe"]]
    server.script(Fault.http(503), Fault.http(503))
    with pytest.raises(EmbeddingFailed, match="did not answer the dimension probe.*looks down"):
        _ = make(server, dimension=None, max_attempts=2).dimension


def test_model_id_and_repr_hold_no_url_or_key(servers):
    server = servers("cohere")
    embedder = make(server, api_key_env="EA_COHERE_KEY", model="embed-v4.0")
    assert embedder.model_id == "cohere:embed-v4.0"
    assert KEY not in repr(embedder) and "EA_COHERE_KEY" in repr(embedder)
    assert embedder.max_batch == 96 and embedder.max_input_tokens == 8191


def test_batches_by_inputs_and_tokens_concurrently(servers):
    server = servers("openai")
    texts = [" ".join([f"word{i:02d}"] * 3) for i in range(12)]  # 3 x ("wor", "d07") = 6 tokens
    embedder = make(server, max_inputs=3, max_tokens=10, concurrency=3)
    np.testing.assert_allclose(embedder.embed_documents(texts), expected(texts), rtol=1e-6)
    assert [len(r.inputs) for r in server.requests] == [1] * 12  # 6 + 6 > 10 tokens
    server.requests.clear()
    make(server, max_inputs=5, max_tokens=1000).embed_documents(texts)
    assert sorted(len(r.inputs) for r in server.requests) == [2, 5, 5]


# -- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_429_retry_after_is_honoured(servers, provider):
    server = servers(provider)
    server.script(Fault.http(429, "rate limit exceeded", retry_after="1"))
    embedder = make(server)
    np.testing.assert_allclose(embedder.embed_documents(TEXTS), expected(TEXTS), rtol=1e-6)
    first, second = server.requests
    assert first.status == 429 and second.status == 200
    assert 0.95 <= second.time - first.time < 1.6
    stats = embedder.stats()
    assert stats["requests"] == 2 and stats["retries"] == 1


def test_retry_after_http_date(servers):
    server = servers("openai")
    when = datetime.now(UTC) + timedelta(seconds=2)
    server.script(Fault.http(503, "overloaded", retry_after=format_datetime(when, usegmt=True)))
    embedder = make(server)
    embedder.embed_documents(TEXTS)
    first, second = server.requests
    assert 0.9 <= second.time - first.time < 2.6  # HTTP dates have whole seconds


def test_parse_retry_after():
    assert parse_retry_after(httpx.Headers({"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Headers({"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Headers({})) is None
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(httpx.Headers({"Retry-After": past})) == 0.0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_5xx_then_success(servers, provider):
    server = servers(provider)
    server.script(Fault.http(500), Fault.http(503), Fault.drop())
    embedder = make(server)
    np.testing.assert_allclose(embedder.embed_documents(TEXTS), expected(TEXTS), rtol=1e-6)
    assert [r.status for r in server.requests] == [500, 503, -1, 200]
    assert embedder.stats()["retries"] == 3


@pytest.mark.parametrize("provider", PROVIDERS)
def test_hang_times_out_and_is_retried(servers, provider):
    server = servers(provider)
    server.script(Fault.hang(1.5))
    embedder = make(server, timeout_s=0.3)
    np.testing.assert_allclose(embedder.embed_documents(TEXTS), expected(TEXTS), rtol=1e-6)
    first, second = server.requests
    assert 0.3 <= second.time - first.time < 1.2  # the client did not wait for the hang


def test_bounded_attempts_then_inputs_fail(servers):
    server = servers("voyage")
    server.script(*[Fault.http(500)] * 10)
    embedder = make(server, max_attempts=3, max_inputs=4)
    vectors, failures = embedder.embed_documents_partial(TEXTS[:4])
    assert len(server.requests) == 3
    assert set(failures) == {0, 1, 2, 3}
    assert all(f.kind == "transient" for f in failures.values())
    assert "gave up after retries: HTTP 500" in failures[0].message
    assert not vectors.any()
    assert embedder.stats()["failed_inputs"] == 4


def test_deadline_stops_before_a_long_retry_after(servers):
    server = servers("jina")
    server.script(Fault.http(429, "slow down", retry_after="30"))
    embedder = make(server, batch_deadline_s=1.0)
    start = time.monotonic()
    _, failures = embedder.embed_documents_partial(TEXTS)
    assert time.monotonic() - start < 1.0 and len(server.requests) == 1
    assert "HTTP 429" in failures[0].message and failures[0].kind == "transient"


# -- too large, rejected inputs, bad answers --------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_413_splits_the_batch(servers, provider):
    server = servers(provider)
    server.max_inputs = 2
    embedder = make(server)
    np.testing.assert_allclose(embedder.embed_documents(TEXTS), expected(TEXTS), rtol=1e-6)
    sizes = sorted(len(r.inputs) for r in server.requests)
    assert sizes == [2, 2, 2, 2, 4, 4, 8]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_single_input_too_large_fails_alone(servers, provider):
    server = servers(provider)
    server.max_chars = 50
    texts = [*TEXTS[:3], "x" * 80, *TEXTS[3:6]]
    embedder = make(server)
    vectors, failures = embedder.embed_documents_partial(texts)
    assert list(failures) == [3] and failures[3].kind == "rejected"
    assert failures[3].message.startswith("too large for the provider")
    ok = [t for i, t in enumerate(texts) if i != 3]
    np.testing.assert_allclose(np.delete(vectors, 3, axis=0), expected(ok), rtol=1e-6)
    assert not vectors[3].any()


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rejected_input_is_isolated_by_bisection(servers, provider):
    server = servers(provider)
    server.reject_text = TEXTS[5]
    embedder = make(server)
    vectors, failures = embedder.embed_documents_partial(TEXTS)
    assert list(failures) == [5] and failures[5].kind == "rejected"
    assert "rejected by the content filter" in failures[5].message
    assert len(failures[5].message) <= 300
    np.testing.assert_allclose(
        np.delete(vectors, 5, axis=0), expected(TEXTS[:5] + TEXTS[6:]), rtol=1e-6
    )
    assert not vectors[5].any()
    # 8 -> 4+4 -> 2+2 -> 1+1: log2(8) levels of bisection, not one request per input.
    assert len(server.requests) == 7
    with pytest.raises(EmbeddingFailed) as info:
        embedder.embed_documents(TEXTS)
    assert list(info.value.failures) == [5] and "input 5 (rejected)" in str(info.value)
    assert isinstance(info.value.failures[5], InputFailure)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_one_unusable_answer_is_bisected_away(servers, provider):
    server = servers(provider)
    embedder = make(server)
    for fault in (Fault.wrong_dim(), Fault.wrong_count()):
        server.requests.clear()
        server.script(fault)
        # Only the first answer (8 inputs) is unusable: its two halves are answered well.
        np.testing.assert_allclose(embedder.embed_documents(TEXTS), expected(TEXTS), rtol=1e-6)
        assert [len(r.inputs) for r in server.requests] == [8, 4, 4]


def test_zero_vector_fails_that_input_only(servers):
    server = servers("ollama")
    server.zero_text = TEXTS[2]
    vectors, failures = make(server).embed_documents_partial(TEXTS)
    assert list(failures) == [2] and failures[2].kind == "bad_output"
    assert "all-zero" in failures[2].message
    assert np.allclose(np.linalg.norm(np.delete(vectors, 2, axis=0), axis=1), 1.0)


def assert_only_failed(vectors, failures, index, kind, texts=TEXTS):
    assert list(failures) == [index] and failures[index].kind == kind, failures
    assert len(failures[index].message) <= 300
    others = [t for i, t in enumerate(texts) if i != index]
    np.testing.assert_allclose(np.delete(vectors, index, axis=0), expected(others), rtol=1e-6)
    assert not vectors[index].any()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(("index", "requests"), [(0, 8), (5, 7)])
def test_400_of_odd_wording_fails_that_input_only(servers, provider, index, requests):
    server = servers(provider)
    server.bad_request_text = TEXTS[index]
    server.bad_request_message = f"something odd about {KEY}"
    embedder = make(server)
    vectors, failures = embedder.embed_documents_partial(TEXTS)
    assert_only_failed(vectors, failures, index, "rejected")
    assert failures[index].message == "HTTP 400: something odd about ***"
    # 8 -> 4+4 -> 2+2 -> 1+1; input 0 is alone before any good answer: one probe text too.
    assert len(server.requests) == requests
    probes = [r for r in server.requests if r.inputs == ["dimension probe"]]
    assert len(probes) == (index == 0)
    server.requests.clear()
    _, failures = embedder.embed_documents_partial(TEXTS)  # answered well before: no probe
    assert list(failures) == [index] and len(server.requests) == 7


@pytest.mark.parametrize("provider", PROVIDERS)
def test_400_for_every_input_is_a_config_error_fast(servers, provider):
    server = servers(provider)
    server.unknown_model = True
    texts = [f"text {i}" for i in range(64)]
    embedder = make(server, max_inputs=16, concurrency=4)  # four batches at once
    with pytest.raises(EmbedderConfigError, match="Check the model name") as info:
        embedder.embed_documents_partial(texts)
    assert "HTTP 400" in str(info.value) and "is not supported" in str(info.value)
    # One batch bisects to a single input (16, 8, 4, 2, 1) and probes; the other batches,
    # running meanwhile, stop at their next request: far fewer requests than inputs.
    assert len(server.requests) <= 4 * 5 + 1
    assert sum(r.inputs == ["dimension probe"] for r in server.requests) == 1
    server.requests.clear()
    with pytest.raises(EmbedderConfigError, match="Check the model name"):
        make(server).embed_query("what is it")
    assert [len(r.inputs) for r in server.requests] == [1, 1]  # the query, then the probe
    with pytest.raises(EmbedderConfigError, match="Check the model name"):
        make(server, dimension=None).embed_documents(TEXTS)  # the dimension probe tells


def test_400_for_every_input_one_batch_request_count(servers):
    server = servers("voyage")
    server.unknown_model = True
    with pytest.raises(EmbedderConfigError, match="Check the model name"):
        make(server).embed_documents(TEXTS)
    assert [len(r.inputs) for r in server.requests] == [8, 4, 2, 1, 1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wrong_dimension_for_one_input_fails_it_only(servers, provider):
    server = servers(provider)
    server.wrong_dim_text = TEXTS[2]
    vectors, failures = make(server).embed_documents_partial(TEXTS)
    assert_only_failed(vectors, failures, 2, "bad_output")
    assert f"vectors of length {DIM + 1}, expected {DIM}" in failures[2].message
    assert len(server.requests) == 7


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wrong_dimension_for_every_input_is_a_clear_error(servers, provider):
    server = servers(provider)
    server.dim = DIM + 1  # the service runs another model than configured
    with pytest.raises(EmbeddingFailed, match=f"expected {DIM}; check the model, `dimension`"):
        make(server).embed_documents_partial(TEXTS)
    assert [len(r.inputs) for r in server.requests] == [8, 4, 2, 1, 1]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_vector_fails_that_input_only(servers, provider):
    server = servers(provider)
    server.missing_vector_text = TEXTS[6]
    vectors, failures = make(server).embed_documents_partial(TEXTS)
    assert_only_failed(vectors, failures, 6, "bad_output")
    assert "returned 0 vectors for 1 inputs" in failures[6].message
    assert len(server.requests) == 7


def test_missing_vector_for_every_input_is_a_clear_error(servers):
    server = servers("cohere")
    server.script(*[Fault.wrong_count()] * 10)
    with pytest.raises(EmbeddingFailed, match="0 vectors for 1 inputs; nothing"):
        make(server).embed_documents(TEXTS)
    assert [len(r.inputs) for r in server.requests] == [8, 4, 2, 1, 1]


def test_one_slow_input_times_out_alone(servers):
    server = servers("openai")
    server.slow_text = TEXTS[3]
    embedder = make(server, timeout_s=0.5, max_attempts=2)
    start = time.monotonic()
    vectors, failures = embedder.embed_documents_partial(TEXTS)
    elapsed = time.monotonic() - start
    assert_only_failed(vectors, failures, 3, "transient")
    assert "timed out also when sent alone" in failures[3].message
    # 2 attempts of 8, then each half once: 4+4, 2+2, 1+1 (the slow one alone last).
    assert [len(r.inputs) for r in server.requests] == [8, 8, 4, 4, 2, 2, 1, 1]
    assert [len(r.inputs) for r in server.requests if TEXTS[3] in r.inputs] == [8, 8, 4, 2, 1]
    assert elapsed < 4.0  # five timeouts of 0.5 s, not retries of each half
    assert embedder.stats()["failed_inputs"] == 1


def test_slow_service_is_not_split_further(servers):
    server = servers("openai")
    server.script(*[Fault.hang(3.0)] * 20)  # every request hangs: the service, not an input
    embedder = make(server, timeout_s=0.5, max_attempts=2)
    vectors, failures = embedder.embed_documents_partial(TEXTS)
    assert set(failures) == set(range(8)) and not vectors.any()
    assert all(f.kind == "transient" and "timed out" in f.message for f in failures.values())
    assert [len(r.inputs) for r in server.requests] == [8, 8, 4, 4]  # both halves slow: stop


def test_503_everywhere_is_not_bisected(servers):
    server = servers("tei")
    server.script(*[Fault.http(503, "service unavailable")] * 100)
    embedder = make(server, max_attempts=3, max_inputs=4, concurrency=2)
    vectors, failures = embedder.embed_documents_partial(TEXTS)
    assert set(failures) == set(range(8)) and not vectors.any()
    assert all(f.kind == "transient" for f in failures.values())
    assert "gave up after retries: HTTP 503" in failures[0].message
    assert len(server.requests) == 2 * 3  # two batches, three attempts each, no halves
    assert sorted(len(r.inputs) for r in server.requests) == [4] * 6


# -- configuration errors and key hygiene -----------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_401_names_the_env_var_and_is_not_retried(servers, provider, monkeypatch):
    server = servers(provider)
    wrong = "sk-wrong-KEY-9876543210"
    monkeypatch.setenv("EA_TEST_API_KEY", wrong)
    if provider not in AUTH_PROVIDERS:  # these services check no key: a proxy in front might
        server.script(Fault.http(401, f"Incorrect API key provided: {wrong}"))
    embedder = make(server, api_key=None, api_key_env="EA_TEST_API_KEY")
    with pytest.raises(EmbedderConfigError) as info:
        embedder.embed_documents(TEXTS)
    message = str(info.value)
    assert "EA_TEST_API_KEY" in message and "HTTP 401" in message
    assert wrong not in message and "***" in message  # the echoed key is redacted
    assert len(server.requests) == 1


def test_missing_env_var_and_404(servers, monkeypatch):
    server = servers("voyage")
    monkeypatch.delenv("EA_UNSET_KEY", raising=False)
    with pytest.raises(EmbedderConfigError, match="EA_UNSET_KEY is not set"):
        make(server, api_key=None, api_key_env="EA_UNSET_KEY").embed_documents(TEXTS)
    wrong_root = server.base_url.removesuffix("/v1")  # base URL without /v1: 404
    with pytest.raises(EmbedderConfigError, match="Check the base URL"):
        make([wrong_root], "voyage").embed_documents(TEXTS)
    assert server.requests[-1].status == 404 and len(server.requests) == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_key_never_in_logs_exceptions_or_stats(servers, provider, caplog):
    caplog.set_level(logging.DEBUG)  # includes httpx / httpcore debug logging
    server = servers(provider)
    server.reject_text = TEXTS[1]
    server.script(
        Fault.http(429, f"slow down {KEY}", retry_after="0"),
        Fault.http(500, f"boom {KEY}"),
        Fault.drop(),
        Fault.hang(0.6),
        Fault.wrong_dim(),
        Fault.http(401, f"Incorrect API key provided: {KEY}"),
        Fault.http(403, f"forbidden for {KEY}"),
    )
    embedder = make(server, timeout_s=0.3, max_attempts=5)
    texts_seen: list[str] = [repr(embedder)]
    for _ in range(4):
        try:
            texts_seen.append(repr(embedder.embed_documents_partial(TEXTS)[1]))
        except Exception as exc:  # noqa: BLE001 - every failure text is checked
            texts_seen.append("".join(traceback.format_exception(exc)))
    assert any("EmbedderConfigError" in t for t in texts_seen)
    texts_seen.append(repr(embedder.stats()))
    texts_seen.append(caplog.text)
    texts_seen.extend(str(r.__dict__) for r in caplog.records)
    assert "HTTP Request: POST" in caplog.text  # httpx's own log was captured
    for text in texts_seen:
        assert KEY not in text


# -- several base URLs ------------------------------------------------------------------------


def test_failover_with_one_url_down_and_recovery(servers):
    down_port = free_port()  # nothing listens here yet
    live = servers("openai")
    down_url = f"http://127.0.0.1:{down_port}/v1"
    embedder = make(
        [down_url, live.base_url], "openai", max_inputs=1, url_cooloff_s=0.5, concurrency=1
    )
    np.testing.assert_allclose(embedder.embed_documents(TEXTS), expected(TEXTS), rtol=1e-6)
    assert len(live.requests) == len(TEXTS)  # one refused connection, then only the live one
    assert embedder.stats()["retries"] == 1

    revived = servers("openai", port=down_port)
    time.sleep(0.6)  # past the cool-off
    embedder.embed_documents(TEXTS)
    assert len(revived.requests) >= 3  # back in the round-robin


def test_5xx_fails_over_to_the_other_url_without_backoff(servers):
    sick, healthy = servers("tei"), servers("tei")
    sick.script(*[Fault.http(503, "unhealthy")] * 50)
    urls = [sick.base_url, healthy.base_url]
    embedder = make(
        urls, "tei", max_inputs=1, url_cooloff_s=30, concurrency=1, backoff_initial_s=5.0
    )
    start = time.monotonic()
    embedder.embed_documents(TEXTS)
    assert time.monotonic() - start < 2.0  # retried on the healthy URL at once
    assert len(sick.requests) == 1 and len(healthy.requests) == len(TEXTS)


def test_round_robin_spreads_load(servers):
    a, b = servers("jina"), servers("jina")
    make([a.base_url, b.base_url], "jina", max_inputs=1, concurrency=1).embed_documents(TEXTS)
    assert len(a.requests) == len(b.requests) == len(TEXTS) // 2


# -- rate limits ------------------------------------------------------------------------------


def test_requests_per_second_shared_by_name_across_threads(servers):
    server = servers("ollama")
    name = f"limited-{uuid.uuid4().hex}"
    # Two embedders, same name: one budget of 5 requests/s (burst 5) for 20 requests.
    embedders = [
        make(server, name=name, requests_per_second=5, max_inputs=1, concurrency=2)
        for _ in range(2)
    ]
    start = time.monotonic()
    texts = [f"text {i}" for i in range(10)]
    threads = [threading.Thread(target=e.embed_documents, args=(texts,)) for e in embedders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - start
    assert len(server.requests) == 20
    assert 2.9 <= elapsed < 5.0  # 5 at once, then one every 200 ms
    throttled = sum(e.stats()["throttled_seconds"] for e in embedders)
    assert throttled > 5  # many threads each waited


def test_tokens_per_minute(servers):
    server = servers("cohere")
    embedder = make(server, tokens_per_minute=120, max_inputs=100)
    assert embedder.max_tokens == 120  # a request never asks more than a minute's budget
    start = time.monotonic()
    embedder.embed_documents(["abc " * 120])  # 120 tokens: the whole bucket
    embedder.embed_documents(["abc abc"])  # 2 more: 2 tokens/s refill -> ~1 s
    elapsed, throttled = time.monotonic() - start, embedder.stats()["throttled_seconds"]
    assert 0.9 <= elapsed < 2.5 and 0.5 <= throttled <= elapsed, (elapsed, throttled)


# -- stats ------------------------------------------------------------------------------------


def test_stats_counters(servers):
    server = servers("openai")
    server.reject_text = TEXTS[0]
    server.script(Fault.http(500))
    embedder = make(server, max_inputs=4)
    embedder.embed_documents_partial(TEXTS)
    stats = embedder.stats()
    tokens = EstimatingTokenizer()
    assert stats["tokens"] == sum(tokens.count(t) for t in TEXTS[1:])
    assert stats["usage_prompt_tokens"] == stats["usage_total_tokens"] > 0
    assert stats["failed_inputs"] == 1 and stats["retries"] == 1
    assert stats["requests"] == len(server.requests)
    assert set(stats) == {
        "requests",
        "retries",
        "throttled_seconds",
        "tokens",
        "usage_prompt_tokens",
        "usage_total_tokens",
        "failed_inputs",
    }


# -- error classification (real providers' wording) -------------------------------------------


@pytest.mark.parametrize(
    ("provider", "status", "body", "expected_class"),
    [
        ("openai", 429, '{"error": {"message": "Rate limit reached"}}', "retry"),
        ("openai", 502, "Bad gateway", "retry"),
        ("openai", 401, '{"error": {"message": "Incorrect API key provided"}}', "fatal"),
        ("openai", 404, '{"error": {"message": "The model does not exist"}}', "fatal"),
        (
            "openai",
            400,
            '{"error": {"message": "This model\'s maximum context length is 8192 tokens, '
            'however you requested 9000 tokens"}}',
            "too_large",
        ),
        (
            "openai",
            400,
            '{"error": {"message": "Requested 310000 tokens, max 300000 tokens per request"}}',
            "too_large",
        ),
        (
            "openai",
            400,
            '{"error": {"message": "\'$.input\' is invalid. Please check the API reference"}}',
            "rejected_input",
        ),
        ("openai", 400, '{"error": {"message": "Invalid value for dimensions"}}', "fatal"),
        ("ollama", 500, '{"error": "the input length exceeds the context length"}', "too_large"),
        ("ollama", 500, '{"error": "llama runner process has terminated"}', "retry"),
        (
            "voyage",
            400,
            '{"detail": "The max allowed tokens per submitted batch is 120000. Your batch has '
            '130000 tokens after truncation."}',
            "too_large",
        ),
        ("tei", 413, '{"error": "batch size 40 > maximum allowed batch size 32"}', "too_large"),
        (
            "tei",
            422,
            '{"error": "Tokenization error", "error_type": "tokenizer"}',
            "rejected_input",
        ),
        ("tei", 424, '{"error": "backend error", "error_type": "backend"}', "retry"),
        ("cohere", 400, '{"message": "invalid input_type: foo"}', "fatal"),
        ("jina", 403, '{"detail": "Insufficient account balance"}', "fatal"),
    ],
)
def test_classify(provider, status, body, expected_class):
    assert WIRE_FORMATS[provider].classify(status, body) == expected_class


# -- tokenizers -------------------------------------------------------------------------------

SAMPLE = (
    "Dagster keeps embeddings of PostgreSQL rows in sync: pgvector + Qdrant, 2024-05-01. "
    "naïve café déjà-vu; 東京の天気は晴れです 🙂 https://example.com/a_b?c=d#e "
    "def f(x): return {'k': [1, 2, 3]}  0x7f3a9c 1234567890"
)


def test_estimating_tokenizer_over_counts_and_chunks_consistently():
    estimate = EstimatingTokenizer()
    minilm = tokenizer_for("openai", "sentence-transformers/all-MiniLM-L6-v2")
    assert isinstance(minilm, HFTokenizer)
    assert estimate.count(SAMPLE) >= minilm.count(SAMPLE)
    offsets = estimate.encode_offsets(SAMPLE)
    assert len(offsets) == estimate.count(SAMPLE)
    assert all(0 <= s < e <= len(SAMPLE) for s, e in offsets)
    chunks = chunk_text(SAMPLE * 5, estimate, max_tokens=40, overlap=5)
    assert len(chunks) > 1 and all(c.token_count <= 40 for c in chunks)
    assert estimate.count("abcdefg") == 3 and estimate.count("東") == 3 and estimate.count(" ") == 0


def test_tokenizer_for_specs(tmp_path, monkeypatch):
    assert isinstance(tokenizer_for("openai", "text-embedding-3-small"), EstimatingTokenizer)
    assert isinstance(tokenizer_for("ollama", "all-minilm"), HFTokenizer)
    assert isinstance(tokenizer_for("voyage", "voyage-3", "estimate"), EstimatingTokenizer)
    from embedding_assets.embedders.sentence_transformers import resolve_model_dir

    folder, _ = resolve_model_dir("all-MiniLM-L6-v2")
    assert isinstance(tokenizer_for("tei", "bge", f"hf:{folder}"), HFTokenizer)
    assert isinstance(tokenizer_for("tei", "bge", f"hf:{folder / 'tokenizer.json'}"), HFTokenizer)
    with pytest.raises(ValueError, match="not understood"):
        tokenizer_for("tei", "bge", "sentencepiece:x")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # as on a machine without tiktoken
    with pytest.raises(ValueError, match="needs the tiktoken package"):
        tokenizer_for("openai", "text-embedding-3-small", "tiktoken:cl100k_base")
