import dagster as dg

from embedding_assets.embedders.base import Embedder
from embedding_assets.runtime import make_embedder
from embedding_assets.settings import SentenceTransformersEmbedderSpec


class SentenceTransformersResource(dg.ConfigurableResource):
    """A local sentence-transformers model, loaded offline on first use."""

    model: str = "all-MiniLM-L6-v2"
    device: str | None = None
    batch_size: int = 32

    def embedder(self) -> Embedder:
        return make_embedder(
            SentenceTransformersEmbedderSpec(
                provider="sentence_transformers",
                model=self.model,
                device=self.device,
                batch_size=self.batch_size,
            )
        )


def embedder_resource(spec: SentenceTransformersEmbedderSpec) -> SentenceTransformersResource:
    return SentenceTransformersResource(
        model=spec.model, device=spec.device, batch_size=spec.batch_size
    )


def embedder_resource_key(embedder_name: str) -> str:
    return f"embedder_{embedder_name}"
