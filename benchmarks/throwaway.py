"""What the benchmarks share: a free port, a throwaway embedded home, stopping `dev`."""

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

UNSET = ("DATABASE_URL", "QDRANT_URL", "EMBEDDING_ASSETS_SOURCES", "DAGSTER_HOME")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def throwaway_home(prefix: str, **extra: str) -> Path:
    """Point this process (and its children) at a fresh EMBEDDING_ASSETS_HOME with its own
    embedded Postgres port, offline model hubs, and none of the user's services."""
    home = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(
        EMBEDDING_ASSETS_HOME=str(home),
        EMBEDDING_ASSETS_PG_PORT=str(free_port()),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        **extra,
    )
    for name in UNSET:
        os.environ.pop(name, None)
    return home


def stop_group(process: subprocess.Popen, timeout: float = 60) -> None:
    """Ctrl-C a process started in its own session (as a terminal would), then kill it."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
