"""The embedders of sources.yaml: a pydantic union on `provider` (local sentence-transformers,
or a remote service over HTTP)."""

import re
from typing import Annotated, Literal

from pydantic import Field, field_validator

from embedding_assets.config.base import Spec
from embedding_assets.core.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS


class _EmbedderSpecBase(Spec):
    # Runs calling one embedder at once (a Dagster pool per embedder bounds them).
    max_concurrent_runs: int = Field(default=2, ge=1)
    # What `embedding-assets plan` multiplies tokens by (a remote provider's list price).
    price_per_million_tokens: float | None = Field(default=None, ge=0)
    # Tokens sent to this embedder per UTC day; once spent, runs take no new rows until
    # the next day (rows wait, nothing fails). None: no budget.
    max_tokens_per_day: int | None = Field(default=None, ge=1)


class SentenceTransformersEmbedderSpec(_EmbedderSpecBase):
    """A local sentence-transformers model, loaded offline in the run's process."""

    provider: Literal["sentence_transformers"]
    model: str = "all-MiniLM-L6-v2"
    device: str | None = None
    # A batch holds at most batch_size texts and max_batch_tokens tokens once padded.
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=4096)
    max_batch_tokens: int = Field(default=DEFAULT_MAX_BATCH_TOKENS, ge=1)
    # bfloat16: ~2x on CPUs with avx512_bf16/AMX; its vectors get their own model id.
    precision: Literal["float32", "bfloat16"] = "float32"


class RemoteEmbedderSpec(_EmbedderSpecBase):
    """An embedding service reached over HTTP. Limits default to the provider's documented
    ones; the API key is read from the environment variable named by `api_key_env`."""

    model: str
    base_urls: tuple[str, ...] = Field(min_length=1)  # tuple: specs are hashable cache keys
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    dimension: int | None = Field(default=None, ge=1)  # else one probe call
    max_inputs_per_request: int | None = Field(default=None, ge=1)
    max_tokens_per_request: int | None = Field(default=None, ge=1)
    max_input_tokens: int | None = Field(default=None, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    timeout_seconds: float = Field(default=60, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    batch_deadline_seconds: float = Field(default=300, gt=0)
    concurrency: int = Field(default=4, ge=1)
    tokenizer: str | None = None  # "hf:<tokenizer.json>", "tiktoken:<encoding>" or "estimate"

    @field_validator("base_urls")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"base_urls entry {url!r} is not an http(s) URL")
        return tuple(url.rstrip("/") for url in value)


class OpenAIEmbedderSpec(RemoteEmbedderSpec):
    """Any OpenAI-compatible /v1/embeddings: OpenAI, Together, vLLM, TEI, Infinity, LiteLLM,
    Ollama's /v1, or `embedding-assets serve`."""

    provider: Literal["openai"]
    dimensions: int | None = Field(default=None, ge=1)  # the API's `dimensions` parameter
    encoding_format: Literal["float", "base64"] = "float"


class OllamaEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["ollama"]


class CohereEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["cohere"]


class VoyageEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["voyage"]
    dimensions: int | None = Field(default=None, ge=1)  # Voyage's `output_dimension`


class JinaEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["jina"]
    dimensions: int | None = Field(default=None, ge=1)


class TEIEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["tei"]


EmbedderSpec = Annotated[
    SentenceTransformersEmbedderSpec
    | OpenAIEmbedderSpec
    | OllamaEmbedderSpec
    | CohereEmbedderSpec
    | VoyageEmbedderSpec
    | JinaEmbedderSpec
    | TEIEmbedderSpec,
    Field(discriminator="provider"),
]
