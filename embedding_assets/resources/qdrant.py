import dagster as dg

from embedding_assets.destinations.qdrant_stores import QdrantStore
from embedding_assets.runtime import qdrant_store


class QdrantResource(dg.ConfigurableResource):
    """A Qdrant server (url, api_key) or, with no url, the embedded Qdrant engine on disk."""

    url: str | None = None
    api_key: str | None = None
    embedded_path: str

    def store(self) -> QdrantStore:
        return qdrant_store(self.url, self.api_key, self.embedded_path)
