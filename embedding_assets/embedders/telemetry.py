"""Embedder calls as Prometheus histograms, in the process that makes them, named after
OpenTelemetry's GenAI client metrics (gen_ai.client.operation.duration,
gen_ai.client.token.usage): per operation (`embeddings`), provider and model; a failed call
is timed with its `error_type`. Served by /metrics of the long-lived processes (ops.metrics)."""

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Histogram

GEN_AI_LABELS = ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model"]
OPERATION_DURATION = Histogram(
    "gen_ai_client_operation_duration_seconds",
    "Duration of embedder calls (gen_ai.client.operation.duration), successful or not.",
    [*GEN_AI_LABELS, "error_type"],
    buckets=(0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96),
)
TOKEN_USAGE = Histogram(
    "gen_ai_client_token_usage",
    "Input tokens per embedder call (gen_ai.client.token.usage).",
    [*GEN_AI_LABELS, "gen_ai_token_type"],
    buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576),
)


def record_embedder_call(
    provider: str, model: str, seconds: float, input_tokens: int | None, error: str = ""
) -> None:
    """One call to an embedder (an HTTP request, or one batch of an in-process model)."""
    labels = ("embeddings", provider, model)
    OPERATION_DURATION.labels(*labels, error).observe(seconds)
    if input_tokens is not None and not error:
        TOKEN_USAGE.labels(*labels, "input").observe(input_tokens)


@contextlib.contextmanager
def embedder_call(provider: str, model: str, input_tokens: int | None) -> Iterator[None]:
    """Time the call in the block; an exception is recorded by its type and raised."""
    started = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        record_embedder_call(
            provider, model, time.perf_counter() - started, None, type(exc).__name__
        )
        raise
    record_embedder_call(provider, model, time.perf_counter() - started, input_tokens)
