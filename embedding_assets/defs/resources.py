"""The `runtime` resource: every source's runtime (settings, engine, embedder, ledger, change
feed, destinations), built in one place and shared by assets, checks, the sensor and the IO
managers. Everything in a process uses the configuration its definitions were built from
(`use_settings`): a file edited during a run cannot stamp vectors with another model than
computed them, a run in flight finishes with the configuration it started with, and a broken
file never reaches a sensor tick or a step of the code location already loaded."""

import contextlib
from collections.abc import Iterator

import dagster as dg
import sqlalchemy as sa
from pydantic import Field, PrivateAttr

from embedding_assets.config.settings import Settings, load_settings
from embedding_assets.destinations.qdrant_engines import qdrant_store
from embedding_assets.destinations.qdrant_store import QdrantStore
from embedding_assets.embedders.base import Embedder
from embedding_assets.embedders.build import make_embedder
from embedding_assets.ops.instance_connections import pool_instance_connections
from embedding_assets.ops.run_health import stamp_worker
from embedding_assets.state.db import engine_for
from embedding_assets.sync.runtime import SourceRuntime, release_all_claims

# The settings each sources file's definitions were built from, in this process.
_BUILT_FROM: dict[str, Settings] = {}


def use_settings(settings: Settings, key: str | None = None) -> None:
    """Record what this process's definitions were built from (under the runtime resource's
    `sources_file`: the file's path, or another key); the runtime resource reads it instead
    of the file (which may have been edited, or broken, since)."""
    _BUILT_FROM[key or str(settings.path)] = settings


class DatabaseResource(dg.ConfigurableResource):
    """The PostgreSQL database holding the sources, the pgvector tables and the row state."""

    url: str = Field(description="postgresql:// URL; set from DATABASE_URL via dg.EnvVar")

    def engine(self) -> sa.Engine:
        return engine_for(self.url)


class QdrantResource(dg.ConfigurableResource):
    """A Qdrant server (url, api_key) or, with no url, the embedded Qdrant engine on disk."""

    url: str | None = None
    api_key: str | None = None
    embedded_path: str

    def store(self) -> QdrantStore:
        return qdrant_store(self.url, self.api_key, self.embedded_path)


class RuntimeResource(dg.ConfigurableResource):
    """Sources' runtimes: the ledger, change feed, pgvector and Qdrant destinations."""

    database: DatabaseResource
    qdrant: QdrantResource
    sources_file: str
    _settings: Settings | None = PrivateAttr(default=None)

    @contextlib.contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator["RuntimeResource"]:
        if context.instance is not None:
            pool_instance_connections(context.instance)  # not one connection per event
        if context.instance is not None and context.dagster_run is not None:
            stamp_worker(context.instance, context.dagster_run)  # so a dead run can be told
        # A run opens an embedded Qdrant collection once, on first use, not per operation.
        try:
            with self.qdrant.store().keep_open():
                yield self
        finally:
            release_all_claims()

    def settings(self) -> Settings:
        if self._settings is None:
            built = _BUILT_FROM.get(str(self.sources_file))
            self._settings = built if built is not None else load_settings(self.sources_file)
        return self._settings

    def source(
        self,
        name: str,
        embedder: Embedder | None = None,
        generation: int | str | None = None,
    ) -> SourceRuntime:
        """The runtime of one generation of source `name` (see `generations.pick`: by
        default the one being built, else the live one), with the embedder of the caller's
        embedder resource (assets, checks, the sensor) or, for IO managers, the same one
        built from settings."""
        from embedding_assets.sync.generations import generation_runtime

        settings = self.settings()
        spec = settings.source(name)
        embedder_spec = settings.embedder_for(spec)
        if embedder is None:
            embedder = make_embedder(embedder_spec)
        return generation_runtime(
            spec, embedder_spec, embedder, self.database.url, self.qdrant.store(), generation
        )

    def generations(self, name: str, embedder: Embedder | None = None) -> list[SourceRuntime]:
        """Runtimes of the source's live and building generations, live first."""
        from embedding_assets.sync.generations import all_runtimes

        settings = self.settings()
        spec = settings.source(name)
        embedder_spec = settings.embedder_for(spec)
        if embedder is None:
            embedder = make_embedder(embedder_spec)
        return all_runtimes(spec, embedder_spec, embedder, self.database.url, self.qdrant.store())


GENERATION_TAG = "embedding_assets/generation"
SHARDS_TAG = "embedding_assets/shards"  # shard keys, comma-separated


def run_generation(tags: dict[str, str]) -> int | None:
    """The generation a run syncs (its tag, set by the sensor); None: the default."""
    value = tags.get(GENERATION_TAG)
    return int(value) if value and value.isdigit() else None


def runtime_of(context, spec, generation: int | None = None) -> SourceRuntime:
    """The source's runtime from an asset or check context: of `generation` (the one the
    step's input rows belong to), else of the one the run is tagged with, with the embedder
    of the source's embedder resource."""
    from embedding_assets.defs.embedder_resources import embedder_resource_key

    embedder = getattr(context.resources, embedder_resource_key(spec.embedder)).embedder()
    run = getattr(context, "run", None)
    if generation is None and run is not None:
        generation = run_generation(run.tags)
    return context.resources.runtime.source(spec.name, embedder, generation)
