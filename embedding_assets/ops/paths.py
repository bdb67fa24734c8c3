"""Where local state lives: the checkout, and the home folder (Postgres data, the Qdrant store, the
Dagster home) under it or under the user's home."""

from __future__ import annotations

import os
from pathlib import Path

# The checkout this package is installed from (editable): pyproject.toml, dagster.yaml.
CHECKOUT = Path(__file__).resolve().parents[2]


def default_home() -> Path:
    """$EMBEDDING_ASSETS_HOME, else <checkout>/.embedding_assets, else ~/.embedding_assets."""
    if env := os.environ.get("EMBEDDING_ASSETS_HOME"):
        return Path(env).expanduser().absolute()
    if (CHECKOUT / "pyproject.toml").is_file():
        return CHECKOUT / ".embedding_assets"
    return Path.home() / ".embedding_assets"
