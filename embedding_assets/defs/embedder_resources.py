"""One Dagster resource per configured embedder. `embedder()` needs no run context, so
sensors, checks and the CLI reuse it; the model or HTTP client is built once per process."""

import os

import dagster as dg
from pydantic import TypeAdapter

from embedding_assets.config.embedders import (
    EmbedderSpec,
    RemoteEmbedderSpec,
    SentenceTransformersEmbedderSpec,
)
from embedding_assets.core.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS
from embedding_assets.embedders.base import Embedder
from embedding_assets.embedders.build import build_embedder

_SPEC = TypeAdapter(EmbedderSpec)


class SentenceTransformersResource(dg.ConfigurableResource):
    """A local sentence-transformers model, loaded offline on first use."""

    model: str = "all-MiniLM-L6-v2"
    device: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    precision: str = "float32"

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # A run that embeds starts loading the model now, so the import overlaps the run's
        # first steps (reading pending rows, chunking) instead of following them.
        run = context.dagster_run
        if run is not None and _embeds(run):
            self.embedder().load_in_background()

    def embedder(self) -> Embedder:
        return build_embedder(
            SentenceTransformersEmbedderSpec(
                provider="sentence_transformers",
                model=self.model,
                device=self.device,
                batch_size=self.batch_size,
                max_batch_tokens=self.max_batch_tokens,
                precision=self.precision,
            ),
            None,
        )


def _embeds(run: dg.DagsterRun) -> bool:
    """Whether a run materializes an `embeddings` asset (a sync job, a UI selection)."""
    if run.asset_selection:
        return any(key.path[-1] == "embeddings" for key in run.asset_selection)
    return run.job_name.endswith("_sync")


class RemoteEmbedderResource(dg.ConfigurableResource):
    """An embedding service over HTTP (openai, ollama, cohere, voyage, jina, tei). The API
    key comes from `dg.EnvVar(api_key_env)`: the UI shows the variable's name, never the key."""

    provider: str
    model: str
    base_urls: list[str]
    api_key: str | None = None
    options: dict = {}  # the remaining sources.yaml fields (limits, timeouts, tokenizer)

    def spec(self) -> RemoteEmbedderSpec:
        return _SPEC.validate_python(
            {
                "provider": self.provider,
                "model": self.model,
                "base_urls": self.base_urls,
                **self.options,
            }
        )

    def embedder(self) -> Embedder:
        return build_embedder(self.spec(), self.api_key)


def embedder_resource(spec) -> dg.ConfigurableResource:
    if isinstance(spec, SentenceTransformersEmbedderSpec):
        return SentenceTransformersResource(
            model=spec.model,
            device=spec.device,
            batch_size=spec.batch_size,
            max_batch_tokens=spec.max_batch_tokens,
            precision=spec.precision,
        )
    options = spec.model_dump(exclude={"provider", "model", "base_urls"}, exclude_none=True)
    key_env = spec.api_key_env
    return RemoteEmbedderResource(
        provider=spec.provider,
        model=spec.model,
        base_urls=list(spec.base_urls),
        api_key=dg.EnvVar(key_env) if key_env and os.environ.get(key_env) else None,
        options=options,
    )


def embedder_resource_key(embedder_name: str) -> str:
    return f"embedder_{embedder_name}"
