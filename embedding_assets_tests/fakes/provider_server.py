"""A scriptable fake of the embedding services, on 127.0.0.1, for remote-embedder tests.

One threaded stdlib HTTP server speaks the wire format of one provider (openai, ollama,
cohere, voyage, jina, tei): request and response shapes of the public API references, the
bearer key checked where the real service checks one (openai, cohere, voyage, jina).

Faults are scripted per request (``server.script(Fault.status(429, retry_after="1"), ...)``:
each request takes the next one) or set as rules that hold for every request (``reject_text``,
``reject_containing``, ``max_inputs``, ``max_chars``, ``zero_text``, ``slow_text``,
``bad_request_text``, ``unknown_model``, ``wrong_dim_text``, ``missing_vector_text``).
Every request is recorded with its arrival time, path, body size, inputs and the input type
the provider saw, so tests can assert attempts and waits. Vectors are deterministic:
``fake_vector(text, dim, input_type)``.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

PATHS = {
    "openai": "/v1/embeddings",
    "ollama": "/api/embed",
    "cohere": "/v2/embed",
    "voyage": "/v1/embeddings",
    "jina": "/v1/embeddings",
    "tei": "/embed",
}
# What a client's base URL is for each provider (the API root the wire format's path joins).
BASE_PATHS = {"openai": "/v1", "voyage": "/v1", "jina": "/v1"}
AUTH_PROVIDERS = {"openai", "cohere", "voyage", "jina"}


def fake_vector(text: str, dim: int, input_type: str = "document") -> np.ndarray:
    """Deterministic unit vector of ``text`` (differs between document and query)."""
    seed = int.from_bytes(hashlib.sha256(f"{input_type}\0{text}".encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Fault:
    """What the server does to one request instead of answering it normally."""

    kind: str  # "status" | "hang" | "drop" | "wrong_dim" | "wrong_count"
    status: int = 500
    message: str = "internal error"
    headers: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @classmethod
    def http(cls, status: int, message: str = "error", retry_after: str | None = None) -> Fault:
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return cls("status", status=status, message=message, headers=headers)

    @classmethod
    def hang(cls, seconds: float) -> Fault:
        """Answer only after ``seconds`` (past the client's timeout)."""
        return cls("hang", seconds=seconds)

    @classmethod
    def drop(cls) -> Fault:
        """Close the connection without answering."""
        return cls("drop")

    @classmethod
    def wrong_dim(cls) -> Fault:
        return cls("wrong_dim")

    @classmethod
    def wrong_count(cls) -> Fault:
        return cls("wrong_count")


@dataclass
class Recorded:
    time: float  # time.monotonic() at arrival
    path: str
    body_size: int
    inputs: list[str]
    input_type: str
    body: Any
    authorization: str | None
    status: int = 0


class ProviderServer:
    """``with ProviderServer("cohere", dim=8, api_key="k") as server: ... server.base_url``."""

    def __init__(
        self,
        provider: str,
        *,
        dim: int = 8,
        api_key: str | None = None,
        port: int = 0,
        record: bool = True,
    ) -> None:
        if provider not in PATHS:
            raise ValueError(f"unknown provider {provider!r}")
        self.provider = provider
        self.dim = dim
        self.api_key = api_key
        self.port = port
        self.reject_text: str | None = None  # 400 naming this input, whenever it is sent
        self.reject_containing: str | None = None  # the same for every input holding it
        self.max_inputs: int | None = None  # 413 for requests with more inputs
        self.max_chars: int | None = None  # "context length exceeded" for longer inputs
        self.zero_text: str | None = None  # answered with an all-zero vector
        self.slow_text: str | None = None  # a request holding it answers after slow_seconds
        self.slow_seconds = 5.0  # longer than the tests' client timeouts
        self.bad_request_text: str | None = None  # 400 of odd wording (bad_request_message)
        self.bad_request_message = "something odd"
        self.unknown_model = False  # 400 "model ... is not supported" for every request
        self.wrong_dim_text: str | None = None  # its vector is one element longer
        self.missing_vector_text: str | None = None  # its vector is left out of the answer
        self.requests: list[Recorded] = []
        self.record = record  # False: keep no request (a test that measures memory)
        self._faults: collections.deque[Fault] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> ProviderServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> ProviderServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{BASE_PATHS.get(self.provider, '')}"

    # -- scripting ----------------------------------------------------------------------------

    def script(self, *faults: Fault) -> None:
        with self._lock:
            self._faults.extend(faults)

    def _next_fault(self) -> Fault | None:
        with self._lock:
            return self._faults.popleft() if self._faults else None

    def _record(self, entry: Recorded) -> None:
        if not self.record:
            return
        with self._lock:
            self.requests.append(entry)

    # -- the provider's shapes ----------------------------------------------------------------

    def parse_request(self, body: dict) -> tuple[list[str], str]:
        """(inputs, input type) as this provider reads them."""
        p = self.provider
        inputs = body["texts"] if p == "cohere" else body["inputs"] if p == "tei" else body["input"]
        if isinstance(inputs, str):
            inputs = [inputs]
        input_type = "document"
        if p == "cohere":
            input_type = {"search_document": "document", "search_query": "query"}[
                body["input_type"]
            ]
        elif p == "voyage":
            input_type = body.get("input_type") or "none"
        elif p == "jina":
            input_type = {"retrieval.passage": "document", "retrieval.query": "query"}[body["task"]]
        return list(inputs), input_type

    def embeddings_body(self, vectors: list[np.ndarray], body: dict, tokens: int) -> Any:
        p = self.provider
        if p == "tei":
            return [v.tolist() for v in vectors]
        if p == "ollama":
            return {
                "model": body["model"],
                "embeddings": [v.tolist() for v in vectors],
                "prompt_eval_count": tokens,
            }
        if p == "cohere":
            return {
                "id": "fake",
                "embeddings": {"float": [v.tolist() for v in vectors]},
                "texts": body["texts"],
                "meta": {"billed_units": {"input_tokens": tokens}},
                "response_type": "embeddings_by_type",
            }
        as_base64 = body.get("encoding_format") == "base64"
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": (
                    base64.b64encode(v.astype("<f4").tobytes()).decode()
                    if as_base64
                    else v.tolist()
                ),
            }
            for i, v in enumerate(vectors)
        ]
        data.reverse()  # clients must order by "index", not by position
        usage = {"total_tokens": tokens}
        if p in ("openai", "jina"):
            usage["prompt_tokens"] = tokens
        return {"object": "list", "data": data, "model": body["model"], "usage": usage}

    def error_body(self, message: str, error_type: str = "validation") -> dict:
        p = self.provider
        if p == "openai":
            return {"error": {"message": message, "type": "invalid_request_error", "code": None}}
        if p == "ollama":
            return {"error": message}
        if p == "cohere":
            return {"id": "fake", "message": message}
        if p == "tei":
            return {"error": message, "error_type": error_type}
        return {"detail": message}  # voyage, jina (FastAPI style)

    def too_long(self, index: int, length: int) -> tuple[int, str]:
        """Each provider's answer to an input over its context length (truncation off)."""
        return {
            "openai": (
                400,
                f"This model's maximum context length is {self.max_chars} tokens, however you "
                f"requested {length} tokens. Please reduce the length of the input.",
            ),
            "ollama": (500, "the input length exceeds the context length"),
            "cohere": (400, f"invalid request: text at index {index} is too long"),
            "voyage": (400, f"Input at index {index} exceeds the context length of the model"),
            "jina": (400, f"Input text at index {index} exceeds the maximum context length"),
            "tei": (
                413,
                f"Input validation error: `inputs` must have less than "
                f"{self.max_chars} tokens. Given: {length}",
            ),
        }[self.provider]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real services
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms ACK stalls
    fake: ProviderServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        fake = self.fake
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = json.loads(raw or b"{}")
        known = self.path == PATHS[fake.provider]
        inputs, input_type = fake.parse_request(body) if known else ([], "")
        entry = Recorded(
            time.monotonic(),
            self.path,
            len(raw),
            inputs,
            input_type,
            body,
            self.headers.get("Authorization"),
        )
        fake._record(entry)
        if not known:
            return self._json(entry, 404, fake.error_body(f"no route {self.path}"))
        if fake.api_key and fake.provider in AUTH_PROVIDERS:
            presented = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            if presented != fake.api_key:
                # Echoes the key it got, as some providers do: clients must redact it.
                return self._json(
                    entry, 401, fake.error_body(f"Incorrect API key provided: {presented}")
                )
        fault = fake._next_fault()
        dim, count = fake.dim, len(inputs)
        if fault is not None:
            if fault.kind == "status":
                return self._json(
                    entry, fault.status, fake.error_body(fault.message), fault.headers
                )
            if fault.kind == "drop":
                self.close_connection = True
                entry.status = -1
                return None
            if fault.kind == "hang":
                fake._stopping.wait(fault.seconds)
            dim += fault.kind == "wrong_dim"
            count -= fault.kind == "wrong_count"
        if fake.unknown_model:  # wording no client pattern knows: only a probe can tell
            message = f"model {body.get('model', 'default')!r} is not supported by this service"
            return self._json(entry, 400, fake.error_body(message))
        if fake.slow_text is not None and fake.slow_text in inputs:
            fake._stopping.wait(fake.slow_seconds)
        if fake.max_inputs is not None and len(inputs) > fake.max_inputs:
            message = f"batch size {len(inputs)} > maximum allowed batch size {fake.max_inputs}"
            return self._json(entry, 413, fake.error_body(message))
        for i, text in enumerate(inputs):
            if fake.max_chars is not None and len(text) > fake.max_chars:
                status, message = fake.too_long(i, len(text))
                return self._json(entry, status, fake.error_body(message))
            if text == fake.reject_text or (
                fake.reject_containing is not None and fake.reject_containing in text
            ):
                message = f"Invalid input at index {i}: {text!r} was rejected by the content filter"
                status = 422 if fake.provider == "tei" else 400
                return self._json(entry, status, fake.error_body(message, "tokenizer"))
            if text == fake.bad_request_text:
                return self._json(entry, 400, fake.error_body(fake.bad_request_message))
        vectors = [
            np.zeros(dim, np.float32)
            if t == fake.zero_text
            else fake_vector(t, dim + (t == fake.wrong_dim_text), input_type)
            for t in inputs[:count]
            if t != fake.missing_vector_text
        ]
        tokens = sum(len(t.split()) for t in inputs)
        self._json(entry, 200, fake.embeddings_body(vectors, body, tokens))

    def _json(
        self, entry: Recorded, status: int, payload: Any, headers: dict[str, str] | None = None
    ) -> None:
        entry.status = status
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True
