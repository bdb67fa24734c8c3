"""The local inference worker: one warm model behind an OpenAI-compatible ``/v1/embeddings``.

A run that imports sentence-transformers pays ~8 CPU-s before it embeds anything; a run that
calls this worker pays ~2. Concurrent requests (8 shards syncing at once) are merged into one
``embed_documents`` call by a single batcher task, which also serialises the model (it is not
thread-safe). No Dagster here; request bodies are never logged (they are user data).

    python -m embedding_assets.worker --port 8321     # or: embedding-assets serve
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from embedding_assets.embedders.base import Embedder
from embedding_assets.embedders.sentence_transformers import (
    DEFAULT_MODEL,
    SentenceTransformerEmbedder,
)

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "Batcher", "create_app", "main", "serve"]

log = logging.getLogger("embedding_assets.worker")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8431  # also the CLI's and the demo sources.yaml's default
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


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future[np.ndarray]


@dataclass
class Batcher:
    """Merges queued requests into one ``embed_documents`` call at a time, off the event loop."""

    embedder: Embedder
    max_batch_inputs: int = 256
    max_wait_ms: float = 5.0
    requests: int = 0
    batches: int = 0
    inputs: int = 0
    _queue: asyncio.Queue[_Job] = field(default_factory=asyncio.Queue, init=False)
    _task: asyncio.Task[None] | None = field(default=None, init=False)
    _last_batch_requests: int = field(default=0, init=False)
    # One thread: the model must never run twice at once (and torch already uses every core).
    _pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="embed"), init=False
    )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the worker is shutting down"))
        self._pool.shutdown(wait=True)

    async def embed(self, texts: list[str]) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.requests += 1
        await self._queue.put(_Job(texts, future))
        return await future

    async def _next_batch(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` plus whatever arrives within max_wait_ms, up to max_batch_inputs inputs;
        returns the batch and the job that did not fit (it opens the next batch)."""
        loop = asyncio.get_running_loop()
        # Wait for company only while clients are seen to come together: a lone client would
        # pay max_wait_ms per request for nothing (measured: 39 vs 51 req/s of 1 text).
        wait_ms = self.max_wait_ms if self._last_batch_requests > 1 else 0.0
        deadline = loop.time() + wait_ms / 1000
        jobs, n = [first], len(first.texts)
        while n < self.max_batch_inputs:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if n + len(job.texts) > self.max_batch_inputs:
                return jobs, job
            jobs.append(job)
            n += len(job.texts)
        return jobs, None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        carry: _Job | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            jobs, carry = await self._next_batch(first)
            self._last_batch_requests = len(jobs) + (carry is not None)
            jobs = [j for j in jobs if not j.future.done()]  # callers that went away
            if not jobs:
                continue
            texts = [t for j in jobs for t in j.texts]
            try:
                vectors = await loop.run_in_executor(
                    self._pool, self.embedder.embed_documents, texts
                )
            except Exception as exc:
                log.exception("embedding a batch of %d inputs failed", len(texts))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self.batches += 1
            self.inputs += len(texts)
            start = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(vectors[start : start + len(j.texts)])
                start += len(j.texts)


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
                vectors = await batcher.embed(texts)
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

    routes = [
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),  # clients whose base URL lacks /v1
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.batcher = batcher
    return app


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


if __name__ == "__main__":
    main()
