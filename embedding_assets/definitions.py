"""The Dagster code location: every source's assets, checks, job and sensor, and the
resources and IO managers they use. The only place that builds dg.Definitions."""

import os

import dagster as dg

from embedding_assets.environment import database_url, qdrant_path
from embedding_assets.factory import build_source_defs
from embedding_assets.io_managers.pgvector import PgVectorIOManager
from embedding_assets.io_managers.qdrant import QdrantIOManager
from embedding_assets.io_managers.staging import StagingIOManager
from embedding_assets.resources.database import DatabaseResource
from embedding_assets.resources.embedders import embedder_resource, embedder_resource_key
from embedding_assets.resources.qdrant import QdrantResource
from embedding_assets.resources.runtime import RuntimeResource
from embedding_assets.settings import Settings, load_settings


def _env_or(name: str, default: str | None):
    # dg.EnvVar keeps secrets out of the UI and run config; the default covers embedded mode.
    return dg.EnvVar(name) if os.environ.get(name) else default


def build_definitions(settings: Settings) -> dg.Definitions:
    database = DatabaseResource(url=_env_or("DATABASE_URL", database_url()))
    qdrant = QdrantResource(
        url=_env_or("QDRANT_URL", None),
        api_key=_env_or("QDRANT_API_KEY", None),
        embedded_path=str(qdrant_path()),
    )
    runtime = RuntimeResource(database=database, qdrant=qdrant, sources_file=str(settings.path))
    resources: dict[str, object] = {
        "database": database,
        "qdrant": qdrant,
        "runtime": runtime,
        "staging_io_manager": StagingIOManager(database=database),
        "pgvector_io_manager": PgVectorIOManager(runtime=runtime),
        "qdrant_io_manager": QdrantIOManager(runtime=runtime),
    }
    for name, spec in settings.embedders.items():
        resources[embedder_resource_key(name)] = embedder_resource(spec)
    per_source = [
        build_source_defs(spec, qdrant_embedded=not os.environ.get("QDRANT_URL"))
        for spec in settings.sources
    ]
    return dg.Definitions(
        assets=[a for s in per_source for a in s.assets],
        asset_checks=[c for s in per_source for c in s.checks],
        jobs=[j for s in per_source for j in (s.job, s.reconcile_job)],
        sensors=[s.sensor for s in per_source],
        schedules=[sch for s in per_source for sch in s.schedules],
        resources=resources,
    )


defs = build_definitions(load_settings())
