"""The shared embedded PostgreSQL server, against a real server in a temporary home."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import embedding_assets
from embedding_assets.ops.embedded_postgres import (
    DAGSTER_DATABASE,
    DATA_DATABASE,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    _pginstall,
)
from embedding_assets.ops.paths import default_home

pytestmark = pytest.mark.integration

REPO_ROOT = Path(embedding_assets.__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(home=tmp_path_factory.mktemp("ea_home"), port=_free_port())
    try:
        # The first start of a fresh home runs initdb and must report that it started the server.
        assert server.start() is True
        yield server
    finally:
        server.stop()
    assert not server.is_running()


def _scalar(url: str, query: str) -> object:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def test_start_is_idempotent(pg: EmbeddedPostgres) -> None:
    pid = pg.status()["pid"]
    assert pg.start() is False
    status = pg.status()
    assert status["running"] is True
    assert status["pid"] == pid
    assert status["port"] == pg.port
    assert status["data_dir"] == str(pg.home / "postgres" / "data")
    assert status["socket_dir"] == str(pg.home / "postgres" / "run")
    assert status["url"] == (
        f"postgresql://postgres:{pg.password}@127.0.0.1:{pg.port}/{DATA_DATABASE}"
    )


def test_urls(pg: EmbeddedPostgres) -> None:
    base = f"postgres:{pg.password}@127.0.0.1:{pg.port}"
    assert pg.url() == f"postgresql://{base}/embedding_assets"
    assert pg.url(DAGSTER_DATABASE, driver="psycopg2") == f"postgresql+psycopg2://{base}/dagster"
    assert pg.url(driver="psycopg") == f"postgresql+psycopg://{base}/embedding_assets"


def test_databases_and_vector_extension(pg: EmbeddedPostgres) -> None:
    assert _scalar(pg.url(), "SELECT '[1,2]'::vector::text") == "[1,2]"
    assert _scalar(pg.url(), "SELECT extname FROM pg_extension WHERE extname = 'vector'")
    assert _scalar(pg.url(DAGSTER_DATABASE), "SELECT current_database()") == DAGSTER_DATABASE


def test_tcp_sqlalchemy_and_unix_socket(pg: EmbeddedPostgres) -> None:
    import sqlalchemy as sa

    for driver in ("psycopg", "psycopg2"):
        engine = sa.create_engine(pg.url(DAGSTER_DATABASE, driver=driver))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT inet_server_port()")).scalar() == pg.port
        engine.dispose()

    psql = _pginstall() / "bin" / "psql"
    sock_dir = pg.status()["socket_dir"]
    cmd = [str(psql), "-h", sock_dir, "-p", str(pg.port), "-U", "postgres", "-d", DATA_DATABASE]
    out = subprocess.run(
        [*cmd, "-Atc", "SELECT inet_server_addr() IS NULL, '[3,4]'::vector"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "t|[3,4]"  # inet_server_addr() is NULL over a unix socket


def test_tcp_needs_the_password_and_only_this_user_reaches_the_socket(
    pg: EmbeddedPostgres,
) -> None:
    """A local login over TCP without the password is refused (it used to be trusted); the
    password file is 0600 and the socket's directory 0700 (the socket itself trusts)."""
    import psycopg

    assert pg.password_file.stat().st_mode & 0o777 == 0o600
    assert (pg.home / "postgres" / "run").stat().st_mode & 0o777 == 0o700
    without = f"postgresql://postgres@127.0.0.1:{pg.port}/{DATA_DATABASE}"
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(without, connect_timeout=5).close()
    wrong = f"postgresql://postgres:nope@127.0.0.1:{pg.port}/{DATA_DATABASE}"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(wrong, connect_timeout=5).close()
    assert _scalar(pg.url(), "SELECT 1") == 1


def test_another_process_does_not_stop_the_server(pg: EmbeddedPostgres) -> None:
    pid = pg.status()["pid"]
    env = {
        **os.environ,
        "EMBEDDING_ASSETS_HOME": str(pg.home),
        "EMBEDDING_ASSETS_PG_PORT": str(pg.port),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    script = (
        "from embedding_assets.ops.embedded_postgres import EmbeddedPostgres\n"
        "print(EmbeddedPostgres.from_env().start())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
    assert pg.status()["pid"] == pid
    assert _scalar(pg.url(), "SELECT 1") == 1


def test_stop_then_start_keeps_data(pg: EmbeddedPostgres) -> None:
    with psycopg.connect(pg.url(), autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, v vector(2))")
        conn.execute("INSERT INTO kept VALUES (1, '[1,2]'), (2, '[3,4]')")

    assert pg.stop() is True
    assert pg.status()["running"] is False
    assert pg.status()["pid"] is None
    assert pg.stop() is False
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(pg.url(), connect_timeout=2)

    assert pg.start() is True
    assert _scalar(pg.url(), "SELECT count(*) FROM kept") == 2
    assert pg.start() is False


def test_start_with_stale_postmaster_pid(pg: EmbeddedPostgres) -> None:
    assert pg.stop() is True
    # A pid file naming a live process that is not postgres (a pid reused after a crash).
    pid_file = pg.home / "postgres" / "data" / "postmaster.pid"
    pid_file.write_text(f"{os.getpid()}\n{pg.home / 'postgres' / 'data'}\n0\n{pg.port}\n")
    assert pg.is_running() is False
    assert pg.start() is True
    assert _scalar(pg.url(), "SELECT count(*) FROM kept") == 2


def test_port_in_use_gives_clear_error(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        server = EmbeddedPostgres(home=tmp_path / "home", port=port)
        with pytest.raises(EmbeddedPostgresError, match=rf"port {port}.*EMBEDDING_ASSETS_PG_PORT"):
            server.start()
    assert not server.is_running()
    assert not (server.home / "postgres" / "data" / "PG_VERSION").exists()  # failed before initdb


def test_running_on_another_port_gives_clear_error(pg: EmbeddedPostgres) -> None:
    other = EmbeddedPostgres(home=pg.home, port=_free_port())
    with pytest.raises(EmbeddedPostgresError, match=rf"already runs on port {pg.port}"):
        other.start()
    assert pg.is_running()


def test_default_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EMBEDDING_ASSETS_HOME", str(tmp_path))
    monkeypatch.setenv("EMBEDDING_ASSETS_PG_PORT", "54999")
    assert default_home() == tmp_path
    server = EmbeddedPostgres.from_env()
    assert (server.home, server.port) == (tmp_path, 54999)
    monkeypatch.delenv("EMBEDDING_ASSETS_HOME")
    in_checkout = (REPO_ROOT / "pyproject.toml").is_file()
    expected = REPO_ROOT if in_checkout else Path.home()
    assert default_home() == expected / ".embedding_assets"
