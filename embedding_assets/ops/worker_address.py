"""Where the local inference worker (`embedding-assets serve`) listens, and the hint that names
it when an embedder at that address does not answer."""

import os
from collections.abc import Iterable

WORKER_PORT_ENV = "EMBEDDING_ASSETS_WORKER_PORT"
DEFAULT_WORKER_PORT = 8431


def worker_port() -> int:
    return int(os.environ.get(WORKER_PORT_ENV) or DEFAULT_WORKER_PORT)


def worker_url() -> str:
    """The URL the bundled demo's `openai` embedder uses to reach `embedding-assets serve`."""
    return f"http://127.0.0.1:{worker_port()}/v1"


def worker_hint(urls: Iterable[str]) -> str:
    """A sentence saying how to start the worker, if one of `urls` is its address; else ''."""
    if worker_url() not in {u.rstrip("/") for u in urls}:
        return ""
    return (
        " Start the local inference worker with `embedding-assets serve` (`embedding-assets dev`"
        " and `make dev` start it; `dg dev` and `dagster dev` alone do not)."
    )
