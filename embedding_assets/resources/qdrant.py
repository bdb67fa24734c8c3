import functools
from pathlib import Path

import dagster as dg

from embedding_assets.stores.qdrant import QdrantStore, open_qdrant_store


@functools.cache
def _store(url: str | None, api_key: str | None, embedded_path: str) -> QdrantStore:
    return open_qdrant_store(url, api_key, Path(embedded_path))


class QdrantResource(dg.ConfigurableResource):
    """A Qdrant server (url, api_key) or, with no url, the embedded Qdrant engine on disk."""

    url: str | None = None
    api_key: str | None = None
    embedded_path: str

    @property
    def embedded(self) -> bool:
        return not self.url

    def store(self) -> QdrantStore:
        return _store(self.url or None, self.api_key or None, self.embedded_path)
