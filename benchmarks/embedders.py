"""Embedding throughput on 2,000 demo texts: the local model in-process and through the
worker (`embedding-assets serve` + the `openai` provider), in float32 and bfloat16.
Prints figures; asserts nothing.

    .venv/bin/python benchmarks/embedders.py [--texts N]
"""

import argparse
import os
import subprocess
import sys
import time
import urllib.request

import numpy as np
from throwaway import free_port


def rate(embed, texts: list[str]) -> tuple[float, np.ndarray]:
    embed(texts[:32])  # warm-up: model load, first request
    started = time.perf_counter()
    vectors = embed(texts)
    return len(texts) / (time.perf_counter() - started), vectors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--texts", type=int, default=2000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from embedding_assets.config.embedders import OpenAIEmbedderSpec
    from embedding_assets.embedders.build import build_embedder
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
    from embedding_assets.ops.demo import read_demo_rows

    texts = [f"{name}: {summary}" for name, _, _, summary in read_demo_rows(limit=args.texts)]
    reference = None
    for precision in ("float32", "bfloat16"):
        local = SentenceTransformerEmbedder(precision=precision)
        speed, vectors = rate(local.embed_documents, texts)
        reference = vectors if reference is None else reference
        cosine = np.sum(reference * vectors, axis=1).min()
        print(f"in-process {precision:8}  {speed:6.0f} texts/s  min cosine to fp32 {cosine:.4f}")

    for precision, model in (
        ("float32", "all-MiniLM-L6-v2"),
        ("bfloat16", "all-MiniLM-L6-v2@bf16"),
    ):
        port = free_port()
        worker = subprocess.Popen(
            [sys.executable, "-m", "embedding_assets.cli", "serve", "--port", str(port)]
            + ["--precision", precision],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for _ in range(300):
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                    break
                except OSError:
                    time.sleep(0.3)
            spec = OpenAIEmbedderSpec(
                provider="openai",
                model=model,
                base_urls=(f"http://127.0.0.1:{port}/v1",),
                max_inputs_per_request=64,
            )
            speed, _ = rate(build_embedder(spec, None).embed_documents, texts)
            print(f"worker     {precision:8}  {speed:6.0f} texts/s  (openai provider, 64/request)")
        finally:
            worker.terminate()
            worker.wait()


if __name__ == "__main__":
    main()
