"""Embedders built from their sources.yaml specs: one per spec and process, so a local model loads
once and a remote one keeps one HTTP client and rate limiter."""

import functools
import os

from embedding_assets.config.embedders import EmbedderSpec, SentenceTransformersEmbedderSpec
from embedding_assets.embedders.base import Embedder

BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@functools.cache
def build_embedder(spec: EmbedderSpec, api_key: str | None) -> Embedder:
    """One embedder per spec and process: a local model loads once, lazily, on first embed;
    a remote one keeps one HTTP client (and its rate limiter) for every thread."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder

    if isinstance(spec, SentenceTransformersEmbedderSpec):
        return _local_embedder(
            spec.model, spec.device, spec.batch_size, spec.max_batch_tokens, spec.precision
        )
    from embedding_assets.embedders.providers import WIRE_FORMATS
    from embedding_assets.embedders.remote import RemoteEmbedder
    from embedding_assets.embedders.tokenizers import tokenizer_for

    wire = WIRE_FORMATS[spec.provider]
    max_input_tokens = spec.max_input_tokens
    # "all-MiniLM-L6-v2@bf16" is how the worker serves the bundled model in bfloat16.
    base_model = spec.model.removesuffix("@bf16")
    if max_input_tokens is None and base_model in BUNDLED_MODEL_NAMES:
        # The bundled open model served remotely (our worker, Infinity, TEI): its own limit.
        max_input_tokens = SentenceTransformerEmbedder(base_model).max_input_tokens
    return RemoteEmbedder(
        wire=wire,
        model=spec.model,
        base_urls=spec.base_urls,
        api_key=api_key,
        api_key_env=spec.api_key_env,
        dimension=spec.dimension,
        dimensions_param=getattr(spec, "dimensions", None),
        encoding_format=getattr(spec, "encoding_format", "float"),
        max_inputs=spec.max_inputs_per_request,
        max_tokens=spec.max_tokens_per_request,
        requests_per_second=spec.requests_per_second,
        tokens_per_minute=spec.tokens_per_minute,
        timeout_s=spec.timeout_seconds,
        max_attempts=spec.max_attempts,
        batch_deadline_s=spec.batch_deadline_seconds,
        tokenizer=tokenizer_for(spec.provider, base_model, spec.tokenizer),
        **({"max_input_tokens": max_input_tokens} if max_input_tokens else {}),
        # Rate limits belong to the endpoint: every embedder spec on it shares one budget.
        name=f"{spec.provider}|{spec.model}|{'|'.join(spec.base_urls)}",
        concurrency=spec.concurrency,
    )


@functools.cache
def _local_embedder(
    model: str, device: str | None, batch_size: int, max_batch_tokens: int, precision: str
) -> Embedder:
    """Keyed by what shapes the vectors and batches only, so the CLI, the Dagster resource
    and a spec differing in, say, `max_concurrent_runs` share one loaded model."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        model=model,
        device=device,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        precision=precision,
    )


def make_embedder(spec: EmbedderSpec) -> Embedder:
    """The embedder outside Dagster (CLI): the API key from the variable `api_key_env`."""
    key_env = getattr(spec, "api_key_env", None)
    return build_embedder(spec, os.environ.get(key_env) if key_env else None)
