"""The worker's batcher serves the live lane's (urgent) requests before queued bulk ones. The
model here is a stand-in that records its calls (the worker's own tests use the real one)."""

import asyncio
import threading
import time

import numpy as np

from embedding_assets.worker.batcher import Batcher


class RecordingModel:
    """Takes 50 ms per call and records the texts of each call, in order."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.started = threading.Event()

    def embed_documents(self, texts: list[str]) -> np.ndarray:
        self.started.set()
        self.calls.append(list(texts))
        time.sleep(0.05)
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)


def test_an_urgent_request_goes_before_queued_bulk_requests() -> None:
    model = RecordingModel()

    async def scenario() -> list[np.ndarray]:
        batcher = Batcher(model, max_batch_inputs=2, max_wait_ms=0)  # type: ignore[arg-type]
        batcher.start()
        bulk = [asyncio.create_task(batcher.embed([f"bulk {i}a", f"bulk {i}b"])) for i in range(4)]
        await asyncio.to_thread(model.started.wait)  # the first bulk batch is in the model
        urgent = asyncio.create_task(batcher.embed(["fresh change"], urgent=True))
        results = await asyncio.gather(*bulk, urgent)
        await batcher.stop()
        assert batcher.urgent_requests == 1
        return results

    results = asyncio.run(scenario())
    order = [texts[0] for texts in model.calls]
    # The bulk batch in progress finishes; the urgent one goes next, alone.
    assert order[:2] == ["bulk 0a", "fresh change"]
    assert model.calls[1] == ["fresh change"]
    assert [r.tolist() for r in results[:1]] == [[[7.0], [7.0]]]
    assert results[-1].tolist() == [[12.0]]


def test_urgent_and_bulk_inputs_are_never_mixed_in_one_call() -> None:
    model = RecordingModel()

    async def scenario() -> None:
        batcher = Batcher(model, max_batch_inputs=8, max_wait_ms=20)  # type: ignore[arg-type]
        batcher.start()
        jobs = [
            batcher.embed(["b1"]),
            batcher.embed(["u1"], urgent=True),
            batcher.embed(["b2"]),
            batcher.embed(["u2"], urgent=True),
        ]
        await asyncio.gather(*jobs)
        await batcher.stop()

    asyncio.run(scenario())
    for call in model.calls:
        assert len({text[0] for text in call}) == 1, model.calls
    assert sorted(t for call in model.calls for t in call) == ["b1", "b2", "u1", "u2"]
