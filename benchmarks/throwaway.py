"""What the benchmarks share: a free port, a throwaway embedded home, Postgres with the free
embedder, starting and stopping `dev`."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

CLI = [sys.executable, "-m", "embedding_assets.cli"]

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


def free_embedder_yaml(base_url: str, model: str = "all-MiniLM-L6-v2", extra: str = "") -> str:
    """The `embedders:` section for the free embedder, named `free` (384-d, base64)."""
    return f"""embedders:
  free:
    provider: openai
    model: {model}
    base_urls: ["{base_url}"]
    dimension: 384
    encoding_format: base64
    max_inputs_per_request: 2048
    max_tokens_per_request: 1000000
{extra}"""


def start_dev(home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`embedding-assets dev` on a free UI port, in its own session, logging to dev.log."""
    with (home / "dev.log").open("w") as log:
        return subprocess.Popen(
            [*CLI, "dev", "--port", str(free_port())],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def postgres_and_free_embedder() -> Iterator[tuple]:
    """The throwaway home's embedded Postgres (DATABASE_URL points at it) and a free HTTP
    embedder; yields (engine, embedder), stops both after."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from free_embedder import FreeEmbedder

    from embedding_assets.ops.embedded_postgres import EmbeddedPostgres
    from embedding_assets.state.db import engine_for

    server = EmbeddedPostgres.from_env()
    server.start()
    embedder = FreeEmbedder().start()
    try:
        os.environ["DATABASE_URL"] = server.url()
        yield engine_for(server.url()), embedder
    finally:
        embedder.stop()
        server.stop()


class TreeMemory:
    """Peak memory of a process and its children, sampled every 0.2 s while a command
    runs: RSS (what `ps` shows, file-backed pages included: the model's weights and the
    embedded Qdrant store are memory-mapped) and anonymous RSS (what the run itself
    allocated; file-backed pages are page cache the kernel can take back)."""

    def __init__(self, pid: int):
        import threading

        self.pid, self.peak_rss_mb, self.peak_anon_mb = pid, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = anon = 0
            for process in tree:
                try:
                    status = Path(f"/proc/{process.pid}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                rss += int(fields.get("VmRSS", "0 kB").split()[0])
                anon += int(fields.get("RssAnon", "0 kB").split()[0])
            self.peak_rss_mb = max(self.peak_rss_mb, rss / 1024)
            self.peak_anon_mb = max(self.peak_anon_mb, anon / 1024)
            self._stop.wait(0.2)

    def stop(self) -> "TreeMemory":
        self._stop.set()
        self._thread.join()
        return self
