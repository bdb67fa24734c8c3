"""Builds the plain objects a source needs (embedder, pgvector store) from settings.

Shared by resources, IO managers, the sensor, checks and the CLI, so all of them agree on
the model id and pipeline version of a source.
"""

import functools
import os
from pathlib import Path

from embedding_assets.embedders.base import Embedder
from embedding_assets.settings import EmbedderSpec, Settings, SourceSpec
from embedding_assets.stores.db import engine_for
from embedding_assets.stores.pgvector import PgVectorStore, pipeline_version
from embedding_assets.stores.qdrant import QdrantStore, open_qdrant_store


@functools.cache
def make_embedder(spec: EmbedderSpec) -> Embedder:
    """One embedder per spec and process: the model loads once, lazily, on first embed."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder

    return SentenceTransformerEmbedder(
        model=spec.model, device=spec.device, batch_size=spec.batch_size
    )


def store_for(spec: SourceSpec, database_url: str, embedder: Embedder) -> PgVectorStore:
    version = pipeline_version(embedder.model_id, spec.chunking.max_tokens, spec.chunking.overlap)
    return PgVectorStore(engine_for(database_url), spec, embedder.model_id, version)


def pg_store(settings: Settings, source: str, database_url: str) -> PgVectorStore:
    spec = settings.source(source)
    return store_for(spec, database_url, make_embedder(settings.embedder_for(spec)))


@functools.cache
def qdrant_store(url: str | None, api_key: str | None, embedded_path: str) -> QdrantStore:
    """One store per configuration and process (an in-memory client keeps its points)."""
    return open_qdrant_store(url or None, api_key or None, Path(embedded_path))


def qdrant_store_from_env() -> QdrantStore:
    from embedding_assets.environment import qdrant_path

    return qdrant_store(
        os.environ.get("QDRANT_URL"), os.environ.get("QDRANT_API_KEY"), str(qdrant_path())
    )
