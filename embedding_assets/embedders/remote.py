"""Embedding through an HTTP service: batching, retries, failover, rate limits, validation.

No Dagster here. The provider-specific parts (request body, response parsing, what an error
status means) are small ``WireFormat`` classes in providers.py; this module is the engine they
share:

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

import email.utils
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import httpx
import numpy as np
import pyrate_limiter
import tenacity

from embedding_assets.core.batching import token_batches
from embedding_assets.embedders.base import (
    HFTokenizer,
    InputFailure,
    Tokenizer,
    check_embeddings,
)

__all__ = [
    "EmbedderConfigError",
    "EmbeddingFailed",
    "EstimatingTokenizer",
    "RemoteEmbedder",
    "WireFormat",
    "tokenizer_for",
]

logger = logging.getLogger(__name__)

InputType = Literal["document", "query"]
_REASON_CHARS = 300
_PROBE_TEXT = "dimension probe"  # harmless input: sent to learn the dimension or the config


class WireFormat(Protocol):
    """One provider's request/response shapes (implementations: providers.py)."""

    provider: str
    default_max_inputs: int
    default_max_tokens: int

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        """(path relative to the base URL, JSON body)."""
        ...

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        """(vectors (n, d) float32 in input order, usage counts; may be empty)."""
        ...

    def classify(
        self, status: int, body: str
    ) -> Literal["retry", "too_large", "rejected_input", "fatal"]: ...


class EmbedderConfigError(RuntimeError):
    """The provider refused the request for a reason retrying cannot fix (key, URL, model)."""


class EmbeddingFailed(ValueError):
    """Some inputs could not be embedded, or the provider answered with invalid vectors."""

    def __init__(self, message: str, failures: dict[int, InputFailure] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


# -- internal outcomes of one request ---------------------------------------------------------


class _Transient(Exception):
    """Worth retrying: 429, 5xx, connection error, timeout."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        failover: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.failover = failover  # another base URL is up: retry there at once
        self.timed_out = timed_out  # sent, but no answer in time: maybe one slow input


class _TooLarge(Exception):
    pass


class _Rejected(Exception):
    pass


class _BadRequest(Exception):
    """A 400/422 of no known wording: one input at fault, or the configuration (model)."""

    def __init__(self, status: int, url: str, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.url, self.detail = status, url, detail


class _BadOutput(Exception):
    """An answer without usable vectors: wrong length or count, unreadable body.

    ``str()`` describes it for one input; ``config_message`` names the settings to check,
    for when every input gets such answers."""

    def __init__(self, message: str, config_message: str) -> None:
        super().__init__(message)
        self.config_message = config_message


class _Stopped(Exception):
    """Another batch of the same call failed for good: send nothing more."""


@dataclass
class _Call:
    """One embed_documents_partial/embed_query call, shared by its batches' threads."""

    input_type: InputType
    dim: int
    stop: threading.Event = field(default_factory=threading.Event)


# -- tokenizers for chunking ------------------------------------------------------------------

_PIECES = re.compile(r"(?P<word>[A-Za-z0-9_]+)|\S")


class EstimatingTokenizer:
    """Over-counting token estimate for providers whose tokenizer is not available offline.

    Chunks are cut to ``max_input_tokens`` of *this* count, so it must not under-count what
    the provider will count, or the provider rejects (or truncates) the chunk:

    - an ASCII word (letters, digits, ``_``) costs one token per 3 characters, rounded up:
      BPE/WordPiece vocabularies of the hosted models average about 4 characters per token
      for English and code, and split digit runs into groups of at most 3;
    - every other non-space character costs its UTF-8 length in tokens: byte-level BPE never
      needs more than one token per byte, so punctuation costs 1 and a CJK character 3;
    - whitespace costs nothing (merged into the next token).

    It is not a hard bound for random ASCII strings (hashes, base64 blobs tokenize at ~2
    characters per token); if such a chunk is too long for the provider, that input alone
    fails with the provider's reason. For exact counts give a tokenizer spec (``hf:...``).
    """

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for match in _PIECES.finditer(text):
            start, end = match.span()
            if match.lastgroup == "word":
                spans.extend((s, min(s + 3, end)) for s in range(start, end, 3))
            else:  # one token per UTF-8 byte, all spanning the character
                spans.extend([(start, end)] * len(match.group().encode("utf-8", "surrogatepass")))
        return spans

    def count(self, text: str) -> int:
        return len(self.encode_offsets(text))

    def __repr__(self) -> str:
        return "EstimatingTokenizer()"


class TiktokenTokenizer:
    """A tiktoken encoding as a chunking ``Tokenizer`` (only if its file loads offline)."""

    def __init__(self, encoding: Any) -> None:
        self._enc = encoding

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        _, starts = self._enc.decode_with_offsets(self._enc.encode_ordinary(text))
        ends = [*starts[1:], len(text)]
        # Tokens that start inside one character share its start: give each a non-empty span.
        return [(s, max(e, s + 1)) for s, e in zip(starts, ends, strict=True)]

    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text))


_MINILM = re.compile(r"(^|/)all-minilm-l6-v2$|^all-minilm(:(latest|22m|l6-v2))?$")


def tokenizer_for(provider: str, model: str, tokenizer_spec: str | None = None) -> Tokenizer:
    """The tokenizer that chunks text for a remote model.

    ``tokenizer_spec``: ``"hf:<tokenizer.json or the folder holding it>"``,
    ``"tiktoken:<encoding>"`` (needs the ``tiktoken`` package and its encoding file available
    offline) or ``"estimate"``. Without a spec: the bundled all-MiniLM-L6-v2 tokenizer when the
    service runs that open model (our worker, Infinity, TEI, Ollama's ``all-minilm``), else
    ``EstimatingTokenizer``. tiktoken is not the default for OpenAI models: it downloads its
    encoding files on first use, which this deployment cannot do.
    """
    if tokenizer_spec:
        kind, _, arg = tokenizer_spec.partition(":")
        if kind == "estimate" and not arg:
            return EstimatingTokenizer()
        if kind == "hf" and arg:
            path = Path(arg).expanduser()
            return HFTokenizer.from_file(path / "tokenizer.json" if path.is_dir() else path)
        if kind == "tiktoken" and arg:
            return _load_tiktoken(arg)
        raise ValueError(
            f"tokenizer spec {tokenizer_spec!r} not understood: use 'hf:<path to tokenizer.json "
            "or its folder>', 'tiktoken:<encoding name>' or 'estimate'"
        )
    if _MINILM.search(model.strip().lower()):
        from embedding_assets.embedders.sentence_transformers import resolve_model_dir

        folder, _ = resolve_model_dir("all-MiniLM-L6-v2")
        return HFTokenizer.from_file(folder / "tokenizer.json")
    return EstimatingTokenizer()


def _load_tiktoken(encoding: str) -> TiktokenTokenizer:
    try:
        import tiktoken
    except ImportError as exc:
        raise ValueError(
            f"tokenizer 'tiktoken:{encoding}' needs the tiktoken package (`pip install "
            "tiktoken`); or use 'estimate' or an 'hf:' tokenizer.json"
        ) from exc
    try:
        return TiktokenTokenizer(tiktoken.get_encoding(encoding))
    except Exception as exc:  # tiktoken raises requests/OS errors when it cannot download
        raise ValueError(
            f"tiktoken could not load encoding {encoding!r} ({type(exc).__name__}): it downloads "
            "encoding files on first use; pre-populate TIKTOKEN_CACHE_DIR, or use 'estimate' "
            "or an 'hf:' tokenizer.json"
        ) from exc


# -- rate limits shared by every embedder of one name in this process ----------------------------


class _RateLimits:
    """requests/second and tokens/minute token buckets (GCRA: one number of state each)."""

    def __init__(self, requests_per_second: float | None, tokens_per_minute: int | None) -> None:
        self.config = (requests_per_second, tokens_per_minute)
        self._requests = self._tokens = None
        if requests_per_second:
            # limit/interval as integers: rps*1000 per 1000 s; burst of one second's worth.
            rate = pyrate_limiter.Rate(
                max(1, round(requests_per_second * 1000)),
                1_000_000,
                burst=max(1, int(requests_per_second)),
            )
            self._requests = self._limiter(rate)
        if tokens_per_minute:
            self.tokens_per_minute = int(tokens_per_minute)
            rate = pyrate_limiter.Rate(self.tokens_per_minute, pyrate_limiter.Duration.MINUTE)
            self._tokens = self._limiter(rate)

    @staticmethod
    def _limiter(rate: pyrate_limiter.Rate) -> pyrate_limiter.Limiter:
        bucket = pyrate_limiter.StateBucket([rate], algorithm=pyrate_limiter.TokenBucket())
        # A state bucket has nothing to leak: no background leaker thread per limiter.
        factory = pyrate_limiter.SingleBucketFactory(bucket, schedule_leak=False)
        return pyrate_limiter.Limiter(factory, buffer_ms=5)

    def acquire(self, tokens: int) -> float:
        """Block until one request of ``tokens`` tokens may go; returns the seconds waited."""
        start = time.monotonic()
        if self._requests is not None:
            self._requests.try_acquire("requests")
        if self._tokens is not None and tokens > 0:
            # A request larger than a minute's budget would never fit: it takes the whole minute.
            self._tokens.try_acquire("tokens", weight=min(tokens, self.tokens_per_minute))
        return time.monotonic() - start


_LIMITS: dict[str, _RateLimits] = {}
_LIMITS_LOCK = threading.Lock()


def _shared_limits(name: str, rps: float | None, tpm: int | None) -> _RateLimits:
    with _LIMITS_LOCK:
        limits = _LIMITS.get(name)
        if limits is None or limits.config != (rps, tpm):
            limits = _LIMITS[name] = _RateLimits(rps, tpm)
        return limits


# -- base URLs: round-robin with cool-off ---------------------------------------------------------


class _Endpoints:
    def __init__(self, urls: Sequence[str], cooloff_s: float) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._cooloff_s = cooloff_s
        self._down_until: dict[str, float] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            now = time.monotonic()
            up = [u for u in self.urls if self._down_until.get(u, 0.0) <= now]
            if not up:  # all cooling off: try the one that comes back first rather than none
                return min(self.urls, key=lambda u: self._down_until[u])
            return up[next(self._turn) % len(up)]

    def mark_down(self, url: str) -> bool:
        """Cool ``url`` off; True if another URL is up to fail over to."""
        with self._lock:
            now = time.monotonic()
            self._down_until[url] = now + self._cooloff_s
            return any(self._down_until.get(u, 0.0) <= now for u in self.urls)

    def mark_up(self, url: str) -> None:
        if url in self._down_until:
            with self._lock:
                self._down_until.pop(url, None)


def display_url(url: str) -> str:
    """scheme://host[:port]/path: no userinfo, query or fragment (where secrets could hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class _Stats:
    requests: int = 0
    retries: int = 0
    throttled_seconds: float = 0.0
    tokens: int = 0
    usage_prompt_tokens: int = 0
    usage_total_tokens: int = 0
    failed_inputs: int = 0


class RemoteEmbedder:
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
        self._limits = _shared_limits(name, requests_per_second, tokens_per_minute)
        self._endpoints = _Endpoints(base_urls, url_cooloff_s)
        self._backoff = tenacity.wait_exponential_jitter(
            initial=backoff_initial_s, max=backoff_max_s, jitter=backoff_initial_s
        )
        self._client = httpx.Client(
            timeout=timeout_s,
            limits=httpx.Limits(max_connections=max(10, 2 * concurrency)),
        )
        self._stats = _Stats()
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
            probe = self._send([_PROBE_TEXT], 2, "document", dimension=None)
        except _BadRequest as exc:
            raise EmbedderConfigError(
                self._fatal_message(exc.status, exc.url, exc.detail)
            ) from None
        except _BadOutput as exc:
            raise EmbeddingFailed(exc.config_message) from None
        except _Transient as exc:
            raise EmbeddingFailed(
                f"{self.model_id}: the embedder did not answer the dimension probe ({exc}); it "
                "looks down, and the run is retried later. Setting `dimension` skips the probe."
            ) from None
        except (_TooLarge, _Rejected) as exc:
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
        call = _Call("document", dim)

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
                except _Stopped:  # stopped by the batch whose error is raised below
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
        ok, bad = self._embed_group(_Call("query", dim), [text], self._count([text]), [0])
        if bad:
            raise EmbeddingFailed(f"{self.model_id}: query failed: {bad[0].message}", bad)
        return check_embeddings(ok[0][None, :], 1, dim, self.model_id)[0]

    def stats(self) -> dict[str, float]:
        with self._stats_lock:
            return {k: float(v) for k, v in vars(self._stats).items()}

    # -- batches ----------------------------------------------------------------------------

    def _count(self, texts: list[str]) -> list[int]:
        batch = getattr(self._tokenizer, "count_batch", None)
        return list(batch(texts)) if batch else [self._tokenizer.count(t) for t in texts]

    def _embed_group(
        self,
        call: _Call,
        texts: list[str],
        counts: list[int],
        idx: list[int],
        *,
        once_on_timeout: bool = False,
    ) -> tuple[dict[int, np.ndarray], dict[int, InputFailure]]:
        """Embed texts[idx], narrowing every bad answer down to the inputs it is about.

        Too large, rejected, any other 400/422 and unusable answers bisect the group until the
        offending input is alone; a group that times out is split by ``_split_slow``.
        ``once_on_timeout``: a timeout is not retried but raised (``_split_slow`` decides).
        """
        if call.stop.is_set():
            raise _Stopped
        try:
            vectors = self._send(
                [texts[i] for i in idx],
                sum(counts[i] for i in idx),
                call.input_type,
                dimension=call.dim,
                retry_timeouts=not once_on_timeout,
            )
        except (_TooLarge, _Rejected, _BadRequest, _BadOutput) as exc:
            if len(idx) == 1:
                return {}, {idx[0]: self._single_failure(call, exc)}
            mid = len(idx) // 2
            ok, bad = self._embed_group(call, texts, counts, idx[:mid])
            ok2, bad2 = self._embed_group(call, texts, counts, idx[mid:])
            return {**ok, **ok2}, {**bad, **bad2}
        except _Transient as exc:  # retries exhausted
            if exc.timed_out and once_on_timeout:
                raise
            if exc.timed_out and len(idx) > 1:
                return self._split_slow(call, texts, counts, idx, exc)
            # 5xx / 429 / connection: an outage, not an input; these fail, the call goes on.
            failure = InputFailure("transient", f"gave up after retries: {exc}"[:_REASON_CHARS])
            return {}, dict.fromkeys(idx, failure)
        ok: dict[int, np.ndarray] = {}
        bad: dict[int, InputFailure] = {}
        norms = np.linalg.norm(vectors, axis=1)
        for i, vector, norm in zip(idx, vectors, norms, strict=True):
            if not np.isfinite(norm) or norm == 0:
                bad[i] = InputFailure(
                    "bad_output", "the provider returned a NaN or all-zero vector"
                )
            else:
                ok[i] = vector / norm  # providers normalize; this makes it a guarantee
        with self._stats_lock:
            self._stats.tokens += sum(counts[i] for i in ok)
        return ok, bad

    def _split_slow(
        self,
        call: _Call,
        texts: list[str],
        counts: list[int],
        idx: list[int],
        timeout: _Transient,
    ) -> tuple[dict[int, np.ndarray], dict[int, InputFailure]]:
        """texts[idx] timed out (after its retries): send each half once, recurse into the
        halves that time out again; both halves timing out means a slow service: all fail."""
        mid = len(idx) // 2
        ok: dict[int, np.ndarray] = {}
        bad: dict[int, InputFailure] = {}
        slow: list[tuple[list[int], _Transient]] = []
        for half in (idx[:mid], idx[mid:]):
            try:
                half_ok, half_bad = self._embed_group(
                    call, texts, counts, half, once_on_timeout=True
                )
            except _Transient as exc:  # timed out again (raised only for timeouts)
                slow.append((half, exc))
                continue
            ok.update(half_ok)
            bad.update(half_bad)
        if len(slow) == 2:
            failure = InputFailure("transient", f"gave up after retries: {timeout}"[:_REASON_CHARS])
            return {}, dict.fromkeys(idx, failure)
        for half, exc in slow:
            if len(half) == 1:
                reason = f"timed out also when sent alone: {exc}"[:_REASON_CHARS]
                bad[half[0]] = InputFailure("transient", reason)
            else:
                half_ok, half_bad = self._split_slow(call, texts, counts, half, exc)
                ok.update(half_ok)
                bad.update(half_bad)
        return ok, bad

    def _single_failure(self, call: _Call, exc: Exception) -> InputFailure:
        """Why one input failed alone; raises if the configuration is at fault instead."""
        if isinstance(exc, _TooLarge):
            return InputFailure("rejected", f"too large for the provider: {exc}"[:_REASON_CHARS])
        if isinstance(exc, (_BadRequest, _BadOutput)) and not self._answered_ok:
            self._check_config(call)
        kind = "bad_output" if isinstance(exc, _BadOutput) else "rejected"
        return InputFailure(kind, str(exc)[:_REASON_CHARS])

    def _check_config(self, call: _Call) -> None:
        """Before the first good answer, one input's 400 or unusable answer may be the
        configuration's (unknown model, wrong `dimensions`): a harmless text failing the same
        way proves it. One probe per embedder, unless it gets no verdict (transient)."""
        with self._probe_lock:
            if call.stop.is_set():
                raise _Stopped
            if self._answered_ok:  # another thread's probe or batch answered meanwhile
                return
            try:
                self._send([_PROBE_TEXT], 2, call.input_type, dimension=call.dim)
            except _BadRequest as probe:
                call.stop.set()  # before the lock is released: no other batch probes again
                raise EmbedderConfigError(
                    self._fatal_message(probe.status, probe.url, probe.detail)
                ) from None
            except _BadOutput as probe:
                call.stop.set()
                raise EmbeddingFailed(probe.config_message) from None
            except (_Transient, _TooLarge, _Rejected):
                pass  # no verdict: the input's own failure stands

    # -- one request, with retries ----------------------------------------------------------

    def _send(
        self,
        texts: list[str],
        tokens: int,
        input_type: InputType,
        *,
        dimension: int | None,
        retry_timeouts: bool = True,
    ) -> np.ndarray:
        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, _Transient) and (retry_timeouts or not exc.timed_out)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable),
            stop=(
                tenacity.stop_after_attempt(self.max_attempts)
                | tenacity.stop_before_delay(self.batch_deadline_s)
            ),
            wait=self._wait,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(self._attempt, texts, tokens, input_type, dimension)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return exc.retry_after  # the server said when: exactly that
        if isinstance(exc, _Transient) and exc.failover:
            return 0.0
        return self._backoff(state)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        with self._stats_lock:
            self._stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s: %s; attempt %d of %d, retrying in %.2f s",
            self.model_id,
            exc,
            state.attempt_number,
            self.max_attempts,
            wait,
        )

    def _attempt(
        self, texts: list[str], tokens: int, input_type: InputType, dimension: int | None
    ) -> np.ndarray:
        waited = self._limits.acquire(tokens)
        path, body = self.wire.request(
            self.model, texts, input_type, self.dimensions_param, self.encoding_format
        )
        base = self._endpoints.pick()
        url = f"{base}/{path.lstrip('/')}"
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.throttled_seconds += waited
        try:
            response = self._client.post(url, json=body, headers=self._headers())
        except httpx.TimeoutException as exc:
            raise _Transient(
                f"timed out: no answer within {self.timeout_s} s from {display_url(url)} "
                f"({type(exc).__name__})",
                failover=self._endpoints.mark_down(base),
                # The request went out: one slow input may be the cause (a connect or pool
                # timeout is about the service, not the inputs).
                timed_out=isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)),
            ) from None
        except httpx.TransportError as exc:  # no exception text: it could quote the request
            raise _Transient(
                f"connection to {display_url(url)} failed ({type(exc).__name__})",
                failover=self._endpoints.mark_down(base),
            ) from None
        if response.status_code >= 400:
            self._raise_for(response, base, url)
        self._endpoints.mark_up(base)
        shown = display_url(url)
        try:
            vectors, usage = self.wire.parse(response.json(), len(texts))
        except (ValueError, KeyError, TypeError) as exc:
            problem = f"unreadable response from {shown}: {self._redact(str(exc))}"
            raise _BadOutput(
                problem[:_REASON_CHARS], f"{self.model_id}: {problem}"[:_REASON_CHARS]
            ) from None
        if vectors.ndim != 2 or vectors.shape[0] != len(texts):
            problem = f"{shown} returned {vectors.shape[0]} vectors for {len(texts)} inputs"
            raise _BadOutput(
                problem[:_REASON_CHARS],
                f"{self.model_id}: {problem}; nothing from this response is used",
            )
        if dimension is not None and vectors.shape[1] != dimension:
            problem = f"{shown} returned vectors of length {vectors.shape[1]}, expected {dimension}"
            raise _BadOutput(
                problem[:_REASON_CHARS],
                f"{self.model_id}: {problem}; check the model, `dimension` and `dimensions` "
                "settings (nothing from this response is stored)",
            )
        self._answered_ok = True
        with self._stats_lock:
            self._stats.usage_prompt_tokens += usage.get("prompt_tokens", 0)
            self._stats.usage_total_tokens += usage.get(
                "total_tokens", usage.get("prompt_tokens", 0)
            )
        return vectors

    def _raise_for(self, response: httpx.Response, base: str, url: str) -> None:
        status = response.status_code
        text = self._redact(response.text)
        kind = self.wire.classify(status, text)
        detail = _short(text)
        if kind == "retry":
            # A failing server is cooled off; a throttling one (429) is only waited for.
            failover = status >= 500 and self._endpoints.mark_down(base)
            raise _Transient(
                f"HTTP {status} from {display_url(url)}: {detail}",
                retry_after=parse_retry_after(response.headers),
                failover=failover,
            )
        if kind == "too_large":
            raise _TooLarge(f"HTTP {status}: {detail}")
        if kind == "rejected_input":
            raise _Rejected(f"HTTP {status}: {detail}")
        if status in (400, 422):  # no known wording: bisected like a rejected input
            raise _BadRequest(status, display_url(url), detail)
        raise EmbedderConfigError(self._fatal_message(status, display_url(url), detail))

    def _fatal_message(self, status: int, url: str, detail: str) -> str:
        head = f"{self.model_id}: {url} answered HTTP {status} ({detail})."
        if status in (401, 403):
            if self.api_key_env:
                return (
                    f"{head} The API key was refused: set the environment variable "
                    f"{self.api_key_env} to a valid key for {self.wire.provider}."
                )
            return (
                f"{head} The service wants an API key: set `api_key_env` to the name of the "
                "environment variable that holds it."
            )
        if status == 404:
            return (
                f"{head} Check the base URL (the API root, without the endpoint path) and that "
                f"the model {self.model!r} exists on this service."
            )
        return f"{head} Check the model name and the dimensions/provider settings."

    def _headers(self) -> dict[str, str]:
        key = self._api_key
        if key is None and self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EmbedderConfigError(
                    f"{self.model_id}: the environment variable {self.api_key_env} is not set; "
                    f"it must hold the API key for {self.wire.provider}."
                )
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _redact(self, text: str) -> str:
        key = self._api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
        return text.replace(key, "***") if key else text


def error_message(body: str) -> str:
    """The human part of an error body: JSON ``error.message``/``message``/``detail``/``error``."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()
    if isinstance(payload, dict):
        for key in ("error", "message", "detail"):
            value = payload.get(key)
            if isinstance(value, dict):
                value = value.get("message") or json.dumps(value)
            elif isinstance(value, list):  # FastAPI validation errors
                value = json.dumps(value)
            if value:
                return str(value)
    return body.strip()


def _short(text: str) -> str:
    return " ".join(error_message(text).split())[:_REASON_CHARS]


def _as_text_list(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("expected a sequence of texts, got a single str; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"text {i} is {type(t).__name__}, expected str")
    return out
