"""Running the worker: `embedding-assets serve` (or `python -m embedding_assets.worker`) loads the
model, binds the port and serves the app with uvicorn until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
from collections.abc import Sequence

from embedding_assets.embedders.sentence_transformers import (
    DEFAULT_MODEL,
    SentenceTransformerEmbedder,
)
from embedding_assets.worker.app import (
    DEFAULT_MAX_REQUEST_INPUTS,
    create_app,
    default_model_names,
)

log = logging.getLogger("embedding_assets.worker")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8431  # also the CLI's and the demo sources.yaml's default


def serve(
    model: str = DEFAULT_MODEL,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    device: str | None = None,
    precision: str = "float32",
    served_model_names: Sequence[str] | None = None,
    max_batch_inputs: int = 256,
    max_wait_ms: float = 5.0,
    max_request_inputs: int = DEFAULT_MAX_REQUEST_INPUTS,
) -> None:
    """Serve until SIGINT/SIGTERM, then finish in-flight requests and return (exit code 0).
    ``port=0`` picks a free port (the ready line names it)."""
    import uvicorn

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Keep the log to our lines: no per-load INFO chatter or weight-loading progress bar.
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    embedder = SentenceTransformerEmbedder(model, device=device, precision=precision)
    # Listen before loading: a busy port fails at once (a socket only bound would let a second
    # worker bind too, and hang). Connections made while the model loads wait in the backlog
    # and are answered once it is warm.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts despite TIME_WAIT
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    app = create_app(
        embedder,
        max_batch_inputs=max_batch_inputs,
        max_wait_ms=max_wait_ms,
        served_model_names=served_model_names or default_model_names(embedder, model),
        max_request_inputs=max_request_inputs,
        url=f"http://{shown}:{bound}/v1",
    )
    # Access logs off: they add nothing here and cost time per request.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it shut down on, with the handler found at start: a no-op
    # handler here turns a clean shutdown into a normal return instead of death by SIGTERM.
    previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    log.info("embedding worker stopped")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m embedding_assets.worker",
        description="Serve a local sentence-transformers model as OpenAI-compatible embeddings.",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local folder")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    p.add_argument("--device", default=None, help="torch device (default: auto)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    p.add_argument(
        "--served-model-name",
        action="append",
        dest="names",
        metavar="NAME",
        help="accepted model name (repeatable; the first is echoed in responses)",
    )
    p.add_argument("--max-batch-inputs", type=int, default=256)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    args = p.parse_args(argv)
    try:
        serve(
            args.model,
            args.host,
            args.port,
            device=args.device,
            precision=args.precision,
            served_model_names=args.names,
            max_batch_inputs=args.max_batch_inputs,
            max_wait_ms=args.max_wait_ms,
        )
    except OSError as exc:
        p.exit(1, f"embedding worker: {exc.strerror or exc}\n")
