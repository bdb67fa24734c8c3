"""`embedding-assets serve`: the local inference worker on the worker port, and the URL the demo's
embedder reaches it at."""

import click

from embedding_assets.ops.worker_address import WORKER_PORT_ENV, worker_port

__all__ = ["serve"]


@click.command()
@click.option("--model", default="all-MiniLM-L6-v2", show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=None, help=f"Default: ${WORKER_PORT_ENV} or 8431.")
@click.option(
    "--precision",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bfloat16: ~2x on CPUs with avx512_bf16/AMX; served as '<model>@bf16'.",
)
def serve(model: str, host: str, port: int | None, precision: str) -> None:
    """The local model behind an OpenAI-compatible /v1/embeddings (and /health), batching
    concurrent requests into one forward pass: one warm model for every run. /metrics serves
    Prometheus metrics: the model's calls, and every source's figures from the database."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.ops.metrics import serve_store_metrics
    from embedding_assets.worker.server import serve as run_worker

    serve_store_metrics(database_url())

    try:
        run_worker(model=model, host=host, port=port or worker_port(), precision=precision)
    except OSError as exc:  # a busy port or a missing model folder, already explained
        raise click.ClickException(str(exc)) from exc
