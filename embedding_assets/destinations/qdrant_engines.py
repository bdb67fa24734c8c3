"""Which Qdrant engine a configuration gets: a server (QDRANT_URL), qdrant-client's in-memory
mode (tests), or the embedded engine under the home folder; one store per configuration and
process."""

from __future__ import annotations

import functools
from pathlib import Path

from embedding_assets.destinations.qdrant_embedded import EmbeddedQdrantStore
from embedding_assets.destinations.qdrant_server import ServerQdrantStore
from embedding_assets.destinations.qdrant_store import QdrantStore

IN_MEMORY = ":memory:"


def open_qdrant_store(url: str | None, api_key: str | None, embedded_root: Path) -> QdrantStore:
    """A server store when ``url`` is set (``QDRANT_URL``), else the embedded engine.

    ``:memory:`` is qdrant-client's in-process mode: the server code path without a server,
    living as long as the process (tests, trying things out)."""
    if url == IN_MEMORY:
        from qdrant_client import QdrantClient

        return ServerQdrantStore(QdrantClient(location=IN_MEMORY), description=IN_MEMORY)
    if url:
        return ServerQdrantStore.from_url(url, api_key)
    return EmbeddedQdrantStore(embedded_root)


@functools.cache
def qdrant_store(url: str | None, api_key: str | None, embedded_path: str) -> QdrantStore:
    """One store per configuration and process (an in-memory client keeps its points)."""
    return open_qdrant_store(url or None, api_key or None, Path(embedded_path))
