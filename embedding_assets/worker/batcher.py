"""Merging concurrent embedding requests into one model call at a time, off the event loop: the
worker's batcher."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from embedding_assets.embedders.base import Embedder

log = logging.getLogger("embedding_assets.worker")


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
