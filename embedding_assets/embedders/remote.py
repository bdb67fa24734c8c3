"""Embedding through an HTTP service: batching, retries, failover, rate limits, validation.

No Dagster here. The provider-specific parts (request body, response parsing, what an error
status means) are small ``WireFormat`` classes in providers.py (the protocol: wire.py); this
module and the modules beside it are the engine they share (``RemoteEmbedder`` here: batching
and the ``Embedder`` protocol; one request with retries: remote_requests.py; narrowing failures
to inputs: remote_bisection.py; rate limits and failover: limits.py; errors: remote_errors.py;
tokenizers: tokenizers.py):

- inputs are grouped by ``core.batching.token_batches`` under the provider's input and token
  caps, and batches are sent concurrently from a small thread pool;
- 429 / 5xx / connection errors / timeouts are retried by tenacity with exponential backoff and
  jitter, honouring ``Retry-After`` exactly, with bounded attempts and a deadline per batch;
- "too large" answers split the batch in halves; an answer rejecting one input, a 400/422 of
  any other wording, or an unusable answer (wrong vector length or count, unreadable body)
  bisects the batch to isolate the offending input, so the others are still embedded and the
  bad one is reported alone (``InputFailure``: rejected / bad_output). A 400 or unusable answer
  is a configuration error (unknown model, wrong ``dimensions``) only when a harmless probe
  text fails the same way: the probe is sent once, before the embedder's first good answer;
- a batch that times out after its retries is split too, each half sent once: a single slow
  input ends up alone (transient) while the rest is embedded; when both halves time out the
  service is slow, not one input, and splitting stops. Other transient errors (5xx, 429,
  connection) are never bisected: an outage must not multiply requests;
- requests/second and tokens/minute are limited per embedder *name*, across all threads of the
  process (pyrate-limiter token buckets in a module-level registry);
- several base URLs are used round-robin; one failing is cooled off for a while and used again
  after that;
- the API key is only ever put in the ``Authorization`` header: never in logs, exception
  messages, ``repr`` or stats (provider error texts that echo it are redacted).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import numpy as np
import tenacity

from embedding_assets.core.batching import token_batches
from embedding_assets.embedders.base import (
    InputFailure,
    Tokenizer,
    check_embeddings,
)
from embedding_assets.embedders.limits import Endpoints, shared_limits
from embedding_assets.embedders.remote_bisection import Bisection
from embedding_assets.embedders.remote_errors import (
    BadOutput,
    BadRequest,
    EmbedderConfigError,
    EmbeddingFailed,
    Rejected,
    Stopped,
    TooLarge,
    Transient,
    display_url,
)
from embedding_assets.embedders.remote_requests import HttpRequests
from embedding_assets.embedders.tokenizers import tokenizer_for
from embedding_assets.embedders.wire import PROBE_TEXT, Call, WireFormat
from embedding_assets.ops.worker_address import worker_hint

# -- internal outcomes of one request ---------------------------------------------------------


# -- tokenizers for chunking ------------------------------------------------------------------


# -- rate limits shared by every embedder of one name in this process ----------------------------


# -- base URLs: round-robin with cool-off ---------------------------------------------------------


@dataclass
class Stats:
    requests: int = 0
    retries: int = 0
    throttled_seconds: float = 0.0
    tokens: int = 0
    usage_prompt_tokens: int = 0
    usage_total_tokens: int = 0
    failed_inputs: int = 0


class RemoteEmbedder(HttpRequests, Bisection):
    """An ``Embedder`` backed by an embedding service (see providers.py for the formats)."""

    def __init__(
        self,
        *,
        wire: WireFormat,
        model: str,
        base_urls: Sequence[str],
        api_key: str | None = None,
        api_key_env: str | None = None,
        dimension: int | None = None,
        dimensions_param: int | None = None,
        encoding_format: str = "float",
        max_inputs: int | None = None,
        max_tokens: int | None = None,
        requests_per_second: float | None = None,
        tokens_per_minute: int | None = None,
        timeout_s: float = 60,
        max_attempts: int = 6,
        batch_deadline_s: float = 300,
        tokenizer: Tokenizer | None = None,
        max_input_tokens: int = 8191,
        name: str = "remote",
        concurrency: int = 4,
        url_cooloff_s: float = 15.0,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        if isinstance(base_urls, str):
            base_urls = [base_urls]
        if not base_urls:
            raise ValueError(f"{wire.provider}: give at least one base URL")
        if encoding_format not in ("float", "base64"):
            raise ValueError(f"encoding_format must be 'float' or 'base64': {encoding_format!r}")
        if concurrency < 1 or max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be >= 1")
        self.wire = wire
        self.model = model
        self.model_id = f"{wire.provider}:{model}" + (
            f"@{dimensions_param}d" if dimensions_param else ""
        )
        self.name = name
        self.api_key_env = api_key_env
        self._api_key = api_key  # private: only ever sent in the Authorization header
        self._configured_dimension = dimension or dimensions_param
        self.dimensions_param = dimensions_param
        self.encoding_format = encoding_format
        self.max_inputs = max_inputs or wire.default_max_inputs
        self.max_tokens = max_tokens or wire.default_max_tokens
        if tokens_per_minute:  # a request must fit in a minute's token budget
            self.max_tokens = min(self.max_tokens, int(tokens_per_minute))
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.batch_deadline_s = batch_deadline_s
        self.concurrency = concurrency
        self._tokenizer = tokenizer or tokenizer_for(wire.provider, model)
        self._max_input_tokens = max_input_tokens
        self._limits = shared_limits(name, requests_per_second, tokens_per_minute)
        self._endpoints = Endpoints(base_urls, url_cooloff_s)
        self._backoff = tenacity.wait_exponential_jitter(
            initial=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )
        self._client = httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max(10, 2 * concurrency)),
        )
        self._stats = Stats()
        self._stats_lock = threading.Lock()
        self._dimension_lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._answered_ok = False  # set by the first response with usable vectors

    def __repr__(self) -> str:
        urls = [display_url(u) for u in self._endpoints.urls]
        return (
            f"RemoteEmbedder(model_id={self.model_id!r}, base_urls={urls!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    def close(self) -> None:
        self._client.close()

    # -- Embedder protocol ------------------------------------------------------------------

    @property
    def dimension(self) -> int:
        if self._configured_dimension is None:
            with self._dimension_lock:  # one probe even if threads race here
                if self._configured_dimension is None:
                    self._configured_dimension = self._probe_dimension()
        return self._configured_dimension

    def _probe_dimension(self) -> int:
        try:
            probe = self._send([PROBE_TEXT], 2, "document", dimension=None)
        except BadRequest as exc:
            raise EmbedderConfigError(
                self._fatal_message(exc.status, exc.url, exc.detail)
            ) from None
        except BadOutput as exc:
            raise EmbeddingFailed(exc.config_message) from None
        except Transient as exc:
            raise EmbeddingFailed(
                f"{self.model_id}: the embedder did not answer the dimension probe ({exc}); it "
                "looks down, and the run is retried later. Setting `dimension` skips the probe."
                + worker_hint(self._endpoints.urls)
            ) from None
        except (TooLarge, Rejected) as exc:
            raise EmbeddingFailed(
                f"{self.model_id}: could not learn the vector dimension ({exc}); set `dimension`"
            ) from None
        return int(probe.shape[1])

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self._max_input_tokens

    @property
    def max_batch(self) -> int:
        return self.max_inputs

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """float32 (len(texts), dimension), L2-normalized; raises EmbeddingFailed on any failure."""
        vectors, failures = self.embed_documents_partial(texts)
        if failures:
            first = min(failures)
            raise EmbeddingFailed(
                f"{self.model_id}: {len(failures)} of {len(vectors)} inputs failed; "
                f"input {first} ({failures[first].kind}): {failures[first].message}",
                failures,
            )
        return vectors

    embed = embed_documents  # DESIGN.md's name

    def embed_documents_partial(
        self, texts: Sequence[str]
    ) -> tuple[np.ndarray, dict[int, InputFailure]]:
        """Embed what can be embedded: (vectors, {index: InputFailure}); failed rows are zeros.

        Raises EmbedderConfigError when nothing can succeed (key, URL, model: a 401/403/404,
        or a 400 that a harmless probe text gets too) and EmbeddingFailed when a probe text
        gets vectors of the wrong length or count as well (wrong `dimension`/`dimensions`).
        """
        texts = _as_text_list(texts)
        dim = self.dimension
        n = len(texts)
        out = np.zeros((n, dim), dtype=np.float32)
        failures: dict[int, InputFailure] = {}
        if n == 0:
            return out, failures
        counts = self._count(texts)
        batches = token_batches(counts, self.max_inputs, self.max_tokens)
        call = Call("document", dim)

        def run(batch: list[int]) -> tuple[dict[int, np.ndarray], dict[int, InputFailure]]:
            try:
                return self._embed_group(call, texts, counts, batch)
            except BaseException:
                call.stop.set()  # the call fails: the other batches send nothing more
                raise

        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(batches)), thread_name_prefix="embed"
        )
        try:
            futures = [pool.submit(run, batch) for batch in batches]
            for future in futures:
                try:
                    ok, bad = future.result()
                except Stopped:  # stopped by the batch whose error is raised below
                    continue
                for i, vector in ok.items():
                    out[i] = vector
                failures.update(bad)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        good = np.setdiff1d(np.arange(n), np.fromiter(failures, dtype=np.int64))
        check_embeddings(out[good], len(good), dim, self.model_id)
        with self._stats_lock:
            self._stats.failed_inputs += len(failures)
        return out, failures

    def embed_query(self, text: str) -> np.ndarray:
        """float32 (dimension,), L2-normalized, embedded as a query (Cohere/Voyage/Jina)."""
        (text,) = _as_text_list([text])
        dim = self.dimension
        ok, bad = self._embed_group(Call("query", dim), [text], self._count([text]), [0])
        if bad:
            raise EmbeddingFailed(f"{self.model_id}: query failed: {bad[0].message}", bad)
        return check_embeddings(ok[0][None, :], 1, dim, self.model_id)[0]

    def stats(self) -> dict[str, float]:
        with self._stats_lock:
            return {k: float(v) for k, v in vars(self._stats).items()}

    def answers(self, timeout_s: float = 5.0) -> bool:
        """Whether the service embeds now: one one-word request to each base URL in turn,
        no retry, a short timeout. The changes sensor's probe while work waits on a
        failing embedder (its answer is not used, nor counted in `stats`)."""
        path, body = self.wire.request(
            self.model, ["ping"], "document", self.dimensions_param, self.encoding_format
        )
        for base in self._endpoints.urls:
            url = f"{base}/{path.lstrip('/')}"
            try:
                response = self._client.post(
                    url, json=body, headers=self._headers(), timeout=timeout_s
                )
            except httpx.HTTPError:
                continue
            if response.status_code < 400:
                return True
        return False

    # -- batches ----------------------------------------------------------------------------

    def _count(self, texts: list[str]) -> list[int]:
        batch = getattr(self._tokenizer, "count_batch", None)
        return list(batch(texts)) if batch else [self._tokenizer.count(t) for t in texts]

    # -- one request, with retries ----------------------------------------------------------


def _as_text_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, got a single str; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    return out
