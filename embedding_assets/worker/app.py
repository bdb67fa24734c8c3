"""The worker's HTTP app: OpenAI-compatible ``POST /v1/embeddings`` (float or base64), ``GET
/health`` and ``GET /v1/models``, with OpenAI's error shape. Request bodies are never logged."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from embedding_assets.embedders.base import Embedder
from embedding_assets.embedders.remote_requests import LIVE_PRIORITY, PRIORITY_HEADER
from embedding_assets.embedders.sentence_transformers import (
    DEFAULT_MODEL,
)
from embedding_assets.ops.metrics import exposed_registry
from embedding_assets.worker.batcher import Batcher

log = logging.getLogger("embedding_assets.worker")

# OpenAI's own limit on inputs per request.
DEFAULT_MAX_REQUEST_INPUTS = 2048
_BUNDLED_ALIASES = (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}")


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_
        self.param, self.code = param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


def default_model_names(embedder: Embedder, model: str | None = None) -> list[str]:
    """The canonical name (echoed in responses) first, then accepted aliases."""
    short = embedder.model_id.split(":", 1)[-1]
    # A bfloat16 worker answers only to "<name>@bf16": a client configured for the float32
    # model must not silently get (slightly different) bf16 vectors into its table.
    suffix = "@bf16" if short.endswith("@bf16") else ""
    base = short.removesuffix(suffix)
    names = [short]
    if model:
        names.append(model.removesuffix(suffix) + suffix)
    if base == DEFAULT_MODEL:
        names += [alias + suffix for alias in _BUNDLED_ALIASES]
    return list(dict.fromkeys(names))


def _count_tokens(embedder: Embedder, texts: list[str]) -> list[int]:
    tok = embedder.tokenizer
    count_batch = getattr(tok, "count_batch", None)
    return list(count_batch(texts)) if count_batch else [tok.count(t) for t in texts]


def _parse_request(
    body: bytes, names: dict[str, str], dimension: int, max_inputs: int
) -> tuple[str, list[str], str]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string", param="model")
    if model.lower() not in names:
        raise ApiError(
            404,
            f"The model `{model}` does not exist; this worker serves {sorted(set(names.values()))}",
            param="model",
            code="model_not_found",
        )
    raw = payload.get("input")
    texts = [raw] if isinstance(raw, str) else raw
    if not isinstance(texts, list) or not texts:
        raise ApiError(400, "'input' must be a non-empty string or list of strings", param="input")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError(400, f"input {i} is {type(t).__name__}, expected str", param="input")
        if not t:
            raise ApiError(400, f"input {i} is an empty string", param="input")
    if len(texts) > max_inputs:
        raise ApiError(
            413, f"{len(texts)} inputs in one request, at most {max_inputs}", param="input"
        )
    fmt = payload.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise ApiError(
            400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format"
        )
    dims = payload.get("dimensions")
    if dims is not None and (type(dims) is not int or dims != dimension):
        raise ApiError(
            400,
            f"'dimensions' {dims!r} is not supported: this model outputs {dimension} dimensions",
            param="dimensions",
        )
    return names[model.lower()], texts, fmt


def create_app(
    embedder: Embedder,
    *,
    max_batch_inputs: int = 256,
    max_wait_ms: float = 5.0,
    served_model_names: Sequence[str] | None = None,
    max_request_inputs: int = DEFAULT_MAX_REQUEST_INPUTS,
    url: str | None = None,
) -> Starlette:
    """The ASGI app. The model loads (and runs once) during lifespan startup, so no request is
    answered before it is warm. ``url`` only goes into the ready log line."""
    served = list(served_model_names or default_model_names(embedder))
    canonical = served[0]
    names = {n.lower(): canonical for n in served}
    dimension = embedder.dimension
    max_tokens = embedder.max_input_tokens
    batcher = Batcher(embedder, max_batch_inputs, max_wait_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        started = time.perf_counter()
        # Load and run once now: the first request must not pay for the import or first pass.
        await asyncio.to_thread(embedder.embed_documents, ["warm up"])
        batcher.start()
        log.info(
            "embedding worker ready: %s (%s, %d-d) at %s in %.1f s",
            canonical,
            embedder.model_id,
            dimension,
            url or "(ASGI app)",
            time.perf_counter() - started,
        )
        try:
            yield
        finally:
            await batcher.stop()

    async def embeddings(request: Request) -> JSONResponse:
        try:
            model, texts, fmt = _parse_request(
                await request.body(), names, dimension, max_request_inputs
            )
            counts = _count_tokens(embedder, texts)
            for i, c in enumerate(counts):
                # Reject, don't truncate: our chunker never sends such input, so one that does
                # arrive is a bug that silent truncation would hide.
                if c > max_tokens:
                    raise ApiError(
                        400,
                        f"input {i} has {c} tokens, the model takes at most {max_tokens}",
                        param="input",
                        code="context_length_exceeded",
                    )
            try:
                urgent = request.headers.get(PRIORITY_HEADER, "").lower() == LIVE_PRIORITY
                vectors = await batcher.embed(texts, urgent=urgent)
            except Exception as exc:
                raise ApiError(500, f"embedding failed: {exc}", type_="server_error") from None
        except ApiError as err:
            return err.response()
        if fmt == "base64":  # what the openai client decodes: little-endian float32 bytes
            out: list[Any] = [
                base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors
            ]
        else:
            out = vectors.tolist()
        data = [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(out)]
        tokens = sum(counts)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "status": "ok",
                "model": canonical,
                "model_id": embedder.model_id,
                "dimension": dimension,
                "max_input_tokens": max_tokens,
                "requests": batcher.requests,
                "urgent_requests": batcher.urgent_requests,
                "batches": batcher.batches,
                "inputs": batcher.inputs,
            }
        )

    async def models(request: Request) -> JSONResponse:
        data = [
            {"id": n, "object": "model", "created": 0, "owned_by": "embedding-assets"}
            for n in served
        ]
        return JSONResponse({"object": "list", "data": data})

    async def metrics(request: Request) -> Response:
        # In a thread: the store's figures are read from Postgres at each scrape.
        body = await asyncio.to_thread(generate_latest, exposed_registry())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),  # clients whose base URL lacks /v1
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    return app
