"""An OpenAI-compatible /v1/embeddings on 127.0.0.1 that answers instantly with deterministic
unit vectors (base64 float32), so a benchmark measures the pipeline and nothing else.

    .venv/bin/python benchmarks/free_embedder.py --port 8499   # or FreeEmbedder().start()
"""

import argparse
import base64
import json
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

DIMENSION = 384
# Vectors are a fixed random basis mixed by a hash of the text: cheap, distinct, stable.
_BASIS = np.random.default_rng(7).standard_normal((256, DIMENSION)).astype(np.float32)


def vectors_for(texts: list[str]) -> np.ndarray:
    seeds = np.array([zlib.crc32(t.encode()) for t in texts], dtype=np.uint32)
    picks = np.stack([seeds % 256, (seeds >> 8) % 256, (seeds >> 16) % 256], axis=1)
    vectors = _BASIS[picks].sum(axis=1) + _BASIS[(seeds >> 24) % 256] * 0.5
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # quiet
        return None

    def do_GET(self) -> None:
        self._send({"status": "ok"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        vectors = vectors_for(texts)
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.tobytes()).decode() if as_base64 else v.tolist(),
            }
            for i, v in enumerate(vectors)
        ]
        tokens = sum(len(t.split()) for t in texts)
        self._send(
            {
                "object": "list",
                "data": data,
                "model": body.get("model"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _send(self, payload: dict) -> None:
        raw = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class FreeEmbedder:
    def __init__(self, port: int = 0):
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
        self.server.daemon_threads = True

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> "FreeEmbedder":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8499)
    args = parser.parse_args()
    FreeEmbedder(args.port).server.serve_forever()
