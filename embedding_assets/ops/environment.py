"""Where everything lives: environment variables over embedded defaults.

- DATABASE_URL: the Postgres for sources, vectors and the Dagster instance (default: the
  embedded server under EMBEDDING_ASSETS_HOME).
- QDRANT_URL / QDRANT_API_KEY: a Qdrant server (default: the embedded engine on disk).
- EMBEDDING_ASSETS_HOME: all local state: Postgres data, the Qdrant store, the Dagster home.
"""

import os
import shutil
from pathlib import Path

from embedding_assets.destinations.qdrant_engines import qdrant_store
from embedding_assets.destinations.qdrant_store import QdrantStore
from embedding_assets.ops.embedded_postgres import DAGSTER_DATABASE, EmbeddedPostgres
from embedding_assets.ops.paths import CHECKOUT, default_home
from embedding_assets.state.db import with_driver

PROJECT_DAGSTER_YAML = CHECKOUT / "dagster.yaml"
DAGSTER_PG_URL_ENV = "EMBEDDING_ASSETS_DAGSTER_PG_URL"


def uses_embedded_postgres() -> bool:
    return not os.environ.get("DATABASE_URL")


def database_url() -> str:
    return os.environ.get("DATABASE_URL") or EmbeddedPostgres.from_env().url()


def dagster_storage_url() -> str:
    """Instance storage URL, always with the psycopg2 driver (see dagster.yaml)."""
    if url := os.environ.get("DATABASE_URL"):
        return with_driver(url, "psycopg2")
    return EmbeddedPostgres.from_env().url(DAGSTER_DATABASE, driver="psycopg2")


def qdrant_path() -> Path:
    return default_home() / "qdrant"


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or default_home() / "dagster")


def prepare_dagster_home() -> Path:
    """Point DAGSTER_HOME at a folder holding the project's dagster.yaml, and export the
    instance storage URL it reads."""
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    if not os.environ.get("DAGSTER_HOME"):  # ours: run logs and events hold chunk text
        home.chmod(0o700)
    source = PROJECT_DAGSTER_YAML
    if not source.is_file():
        raise FileNotFoundError(
            f"{source} is missing: run embedding-assets from a checkout installed with "
            "`pip install -e .` (make dev does this)"
        )
    target = home / "dagster.yaml"
    if not target.exists() or target.read_text() != source.read_text():
        shutil.copyfile(source, target)
    os.environ["DAGSTER_HOME"] = str(home)
    os.environ.setdefault(DAGSTER_PG_URL_ENV, dagster_storage_url())
    return home


def qdrant_store_from_env() -> QdrantStore:
    from embedding_assets.ops.environment import qdrant_path

    return qdrant_store(
        os.environ.get("QDRANT_URL"), os.environ.get("QDRANT_API_KEY"), str(qdrant_path())
    )


def instance_storage_shared() -> bool:
    """Whether Dagster's runs and events go to the data database (no database of their own)."""
    from sqlalchemy.engine import make_url

    own = os.environ.get(DAGSTER_PG_URL_ENV)
    if not own or not os.environ.get("DATABASE_URL"):
        return bool(os.environ.get("DATABASE_URL")) and not own
    mine, data = make_url(own), make_url(os.environ["DATABASE_URL"])
    return (mine.host, mine.port, mine.database) == (data.host, data.port, data.database)
