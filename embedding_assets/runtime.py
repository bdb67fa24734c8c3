"""Builds the plain objects a source needs (embedder, pgvector store) from settings.

Shared by resources, IO managers, the sensor, checks and the CLI, so all of them agree on
the model id and pipeline version of a source.
"""

import functools
import os
from pathlib import Path

from embedding_assets.embedders.base import Embedder
from embedding_assets.settings import (
    EmbedderSpec,
    SentenceTransformersEmbedderSpec,
    Settings,
    SourceSpec,
)
from embedding_assets.stores.db import engine_for
from embedding_assets.stores.pgvector import PgVectorStore, pipeline_version
from embedding_assets.stores.qdrant import QdrantStore, open_qdrant_store

BUNDLED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


@functools.cache
def build_embedder(spec: EmbedderSpec, api_key: str | None) -> Embedder:
    """One embedder per spec and process: a local model loads once, lazily, on first embed;
    a remote one keeps one HTTP client (and its rate limiter) for every thread."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder

    if isinstance(spec, SentenceTransformersEmbedderSpec):
        return SentenceTransformerEmbedder(
            model=spec.model,
            device=spec.device,
            batch_size=spec.batch_size,
            precision=spec.precision,
        )
    from embedding_assets.embedders.providers import WIRE_FORMATS
    from embedding_assets.embedders.remote import RemoteEmbedder, tokenizer_for

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


def make_embedder(spec: EmbedderSpec) -> Embedder:
    """The embedder outside Dagster (CLI): the API key from the variable `api_key_env`."""
    key_env = getattr(spec, "api_key_env", None)
    return build_embedder(spec, os.environ.get(key_env) if key_env else None)


def store_for(spec: SourceSpec, database_url: str, embedder: Embedder) -> PgVectorStore:
    version = pipeline_version(embedder.model_id, spec.chunking.max_tokens, spec.chunking.overlap)
    return PgVectorStore(engine_for(database_url), spec, embedder.model_id, version)


def pg_store(settings: Settings, source: str, database_url: str) -> PgVectorStore:
    spec = settings.source(source)
    return store_for(spec, database_url, make_embedder(settings.embedder_for(spec)))


def spec_and_store(
    sources_file: str, source: str, database_url: str
) -> tuple[SourceSpec, PgVectorStore]:
    """A source's spec and pgvector store from the sources file (for the IO managers)."""
    from embedding_assets.settings import load_settings

    settings = load_settings(sources_file)
    return settings.source(source), pg_store(settings, source, database_url)


@functools.cache
def qdrant_store(url: str | None, api_key: str | None, embedded_path: str) -> QdrantStore:
    """One store per configuration and process (an in-memory client keeps its points)."""
    return open_qdrant_store(url or None, api_key or None, Path(embedded_path))


def qdrant_store_from_env() -> QdrantStore:
    from embedding_assets.environment import qdrant_path

    return qdrant_store(
        os.environ.get("QDRANT_URL"), os.environ.get("QDRANT_API_KEY"), str(qdrant_path())
    )
