"""The Dagster code location: every source's assets, checks, job and sensor, and the
resources and IO managers they use. The only place that builds dg.Definitions."""

import functools
import os
import warnings

import dagster as dg
from pydantic import TypeAdapter

from embedding_assets.config.components import merge_embedders
from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.settings import Settings, load_settings
from embedding_assets.config.sources import SourceSpec
from embedding_assets.defs.embedder_resources import embedder_resource, embedder_resource_key
from embedding_assets.defs.factory import build_source_defs
from embedding_assets.defs.io_managers import PgVectorIOManager, QdrantIOManager, StagingIOManager
from embedding_assets.defs.resources import (
    DatabaseResource,
    QdrantResource,
    RuntimeResource,
    use_settings,
)
from embedding_assets.ops.environment import database_url, qdrant_path

# Quiet by default. Partitioned asset checks are "preview", code references and backfill
# policies "beta" in Dagster 1.13: a warning per check and process (22 in 15 minutes of
# `dev`) that says nothing a user can act on.
warnings.filterwarnings("ignore", "Specifying a partitions_def", dg.PreviewWarning)
warnings.filterwarnings("ignore", ".*(source_code_references|CodeReference)", dg.BetaWarning)
warnings.filterwarnings("ignore", "Parameter `owners` of initializer", dg.BetaWarning)
warnings.filterwarnings("ignore", "Parameter `backfill_policy`", dg.BetaWarning)


def _env_or(name: str, default: str | None):
    # dg.EnvVar keeps secrets out of the UI and run config; the default covers embedded mode.
    return dg.EnvVar(name) if os.environ.get(name) else default


def build_definitions(settings: Settings) -> dg.Definitions:
    """Every source of `settings` (sources.yaml and the EmbeddingSync components beside it,
    as `load_settings` reads them): the code location's definitions."""
    use_settings(settings)  # runs and ticks of these definitions read no other configuration
    resources = _shared_resources(str(settings.path))
    for name, spec in settings.embedders.items():
        resources[embedder_resource_key(name)] = embedder_resource(spec)
    return _definitions([_source_defs(spec, settings) for spec in settings.sources], resources)


# What EmbeddingSync components built by Dagster's own loader (a project of their own, not
# this code location) add up to in this process: their resources are shared objects, as
# Definitions.merge wants, and their runtime reads every component's source.
COMPONENTS_KEY = "dagster-components"
_COMPONENTS: dict[str, tuple] = {}


def component_definitions(source: SourceSpec, embedders: dict[str, EmbedderSpec]) -> dg.Definitions:
    """One EmbeddingSync component's definitions: exactly what the same entry of sources.yaml
    gives (build_definitions), with resources shared by every component of the project."""
    _COMPONENTS[source.name] = (source, embedders)
    base = load_settings(components=None).embedders  # the project's sources.yaml's embedders
    declared = list(_COMPONENTS.values())
    settings = Settings(
        embedders=merge_embedders(base, [(s.name, e) for s, e in declared]),
        sources=[s for s, _ in declared],
    )
    use_settings(settings, COMPONENTS_KEY)
    resources = dict(_component_resources())
    name = source.embedder
    resources[embedder_resource_key(name)] = _component_embedder(
        name, settings.embedder_for(source).model_dump_json()
    )
    return _definitions([_source_defs(source, settings)], resources)


@functools.cache
def _component_resources() -> dict[str, object]:
    return _shared_resources(COMPONENTS_KEY)


@functools.cache
def _component_embedder(name: str, spec_json: str):
    return embedder_resource(TypeAdapter(EmbedderSpec).validate_json(spec_json))


def _shared_resources(sources_key: str) -> dict[str, object]:
    database = DatabaseResource(url=_env_or("DATABASE_URL", database_url()))
    qdrant = QdrantResource(
        url=_env_or("QDRANT_URL", None),
        api_key=_env_or("QDRANT_API_KEY", None),
        embedded_path=str(qdrant_path()),
    )
    runtime = RuntimeResource(database=database, qdrant=qdrant, sources_file=sources_key)
    return {
        "database": database,
        "qdrant": qdrant,
        "runtime": runtime,
        "staging_io_manager": StagingIOManager(database=database),
        "pgvector_io_manager": PgVectorIOManager(runtime=runtime),
        "qdrant_io_manager": QdrantIOManager(runtime=runtime),
    }


def _source_defs(spec: SourceSpec, settings: Settings):
    return build_source_defs(
        spec, settings.embedder_for(spec), os.environ.get("QDRANT_URL"), str(qdrant_path())
    )


def _definitions(per_source: list, resources: dict[str, object]) -> dg.Definitions:
    return dg.Definitions(
        # Code references: the UI links each asset to the function that defines it.
        assets=dg.with_source_code_references([a for s in per_source for a in s.assets]),
        asset_checks=[c for s in per_source for c in s.checks],
        jobs=[j for s in per_source for j in (*s.jobs, s.reconcile_job)],
        sensors=[sensor for s in per_source for sensor in (s.sensor, s.lag_sensor)],
        schedules=[sch for s in per_source for sch in s.schedules],
        resources=resources,
        # Every run in process, the sensor's and the UI's alike: the multiprocess default
        # costs a fresh interpreter per step (5-8x slower for a shard).
        executor=dg.in_process_executor,
    )


defs = build_definitions(load_settings())
