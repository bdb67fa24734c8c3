"""Dagster's instance storage where embedding_assets keeps it, found the way every
`embedding-assets` command finds it, so Dagster's own tools work in the repo root with
nothing exported (`dg dev`, `dagster dev`, `dagster asset materialize`, ...).

dagster.yaml names this class (`storage: custom:`). When Dagster builds an instance (the
webserver, the daemon, each run worker) it asks for the URL here:

1. EMBEDDING_ASSETS_DAGSTER_PG_URL (what `embedding-assets dev` exports, or yours);
2. else DATABASE_URL (runs and events beside the data, as `embedding-assets` does);
3. else the embedded Postgres under EMBEDDING_ASSETS_HOME, started if it is not running
   (it keeps running, as after any `embedding-assets` command; `embedding-assets db stop`).

Everything else is dagster-postgres's own storage, unchanged.
"""

import os
import sys

from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage

from embedding_assets.ops.embedded_postgres import EmbeddedPostgresError
from embedding_assets.ops.environment import DAGSTER_PG_URL_ENV, dagster_storage_url


class StorageUnavailable(RuntimeError):
    """The instance has nowhere to keep runs and events; says what to run."""


def instance_storage_url() -> str:
    """The psycopg2 URL of Dagster's runs, events and schedules (see the module docstring)."""
    if url := os.environ.get(DAGSTER_PG_URL_ENV):
        return url
    if not os.environ.get("DATABASE_URL"):
        from embedding_assets.ops.embedded_postgres import EmbeddedPostgres

        server = EmbeddedPostgres.from_env()
        try:
            if server.start():
                print(f"started embedded Postgres on port {server.port}", file=sys.stderr)
        except (EmbeddedPostgresError, OSError) as exc:
            raise StorageUnavailable(
                f"Dagster's instance storage: the embedded Postgres could not start ({exc}). "
                "Run `embedding-assets db start` to see why, or set DATABASE_URL (or "
                f"{DAGSTER_PG_URL_ENV}) to a Postgres of your own."
            ) from exc
    return dagster_storage_url()


class EmbeddingAssetsStorage(DagsterPostgresStorage):
    """dagster-postgres storage at `instance_storage_url()`; no config of its own."""

    @classmethod
    def config_type(cls) -> dict:
        return {}

    @classmethod
    def from_config_value(  # ty: ignore[invalid-method-override]
        cls, inst_data: ConfigurableClassData | None, config_value: dict
    ) -> "EmbeddingAssetsStorage":
        return cls(postgres_url=instance_storage_url(), inst_data=inst_data)
