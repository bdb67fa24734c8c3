"""Wire formats of the embedding services: request body, response parsing, error classes.

One small class per provider; ``RemoteEmbedder`` (remote.py) does the HTTP, batching, retries
and validation. Shapes follow each provider's public API reference. Every format asks the
provider *not* to truncate silently: chunks are cut to the model's limit before they are sent,
so an over-long input is a bug to report (it fails alone), not text to lose quietly.
"""

from __future__ import annotations

import base64
import re
from typing import Any, ClassVar, Literal

import numpy as np

from embedding_assets.embedders.remote_errors import error_message
from embedding_assets.embedders.wire import InputType, WireFormat

ErrorClass = Literal["retry", "too_large", "rejected_input", "fatal"]

# Provider answers meaning "this request/input is too big", seen with 400/422 (and Ollama 500):
# OpenAI/vLLM "maximum context length is 8192 tokens", OpenAI "Requested 310000 tokens, max
# 300000 tokens per request", Voyage "The max allowed tokens per submitted batch is 120000",
# TEI "batch size 40 > maximum allowed batch size 32" / "must have less than 512 tokens",
# Ollama "the input length exceeds the context length".
_TOO_LARGE = re.compile(
    r"context length|too (many|long|large)|exceed|max(imum)?( allowed)? (\w+ )?(tokens|batch)"
    r"|max \d+ tokens|tokens per (request|batch)|must have less than|batch size",
    re.IGNORECASE,
)
# ... and "this one input is unacceptable" (bisection isolates it): OpenAI "'$.input' is
# invalid", messages naming an input by index, empty inputs, content filters.
_REJECTED = re.compile(
    r"\$\.input|(input|text)s?\s*(\[\d+\]|#\d+|at (index|position) \d+)|index \d+"
    r"|invalid (input|text)\b|empty (input|string|text)\b|rejected|content (filter|policy)",
    re.IGNORECASE,
)


def decode_vectors(rows: list[Any]) -> np.ndarray:
    """Vectors given as float lists or base64 little-endian float32 strings -> (n, d) float32."""
    if rows and isinstance(rows[0], str):
        rows = [np.frombuffer(base64.b64decode(r), dtype="<f4") for r in rows]
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise ValueError(f"the provider returned vectors of different lengths {sorted(lengths)}")
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), lengths.pop() if rows else 0)


class _WireBase:
    """Shared error classification; subclasses set the request/response shapes."""

    provider: ClassVar[str]
    default_max_inputs: ClassVar[int]
    default_max_tokens: ClassVar[int]
    default_base_url: ClassVar[str | None] = None

    def classify(self, status: int, body: str) -> ErrorClass:
        message = error_message(body)
        if status in (408, 409, 425, 429) or status >= 500:
            return "retry"
        if status in (401, 403, 404):
            return "fatal"
        if status == 413:
            return "too_large"
        if status in (400, 422):
            if _TOO_LARGE.search(message):
                return "too_large"
            if _REJECTED.search(message):
                return "rejected_input"
        return "fatal"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _parse_data_list(payload: Any) -> np.ndarray:
    """OpenAI-style ``{"data": [{"index": i, "embedding": [...] | "base64"}]}``, index order."""
    data = sorted(payload["data"], key=lambda item: item.get("index", 0))
    return decode_vectors([item["embedding"] for item in data])


def _usage(payload: Any) -> dict[str, int]:
    """``usage.prompt_tokens`` / ``usage.total_tokens`` where the provider reports them."""
    usage = payload.get("usage") or {}
    return {k: int(v) for k, v in usage.items() if k in ("prompt_tokens", "total_tokens") and v}


class OpenAIWire(_WireBase):
    """POST {base}/embeddings, base e.g. https://api.openai.com/v1 (also Together, vLLM, TEI's and
    Infinity's OpenAI routes, LiteLLM, Ollama /v1)."""

    provider = "openai"
    # OpenAI API reference, "Create embeddings" (input): any array must be 2048 items or
    # less, and all embedding models enforce 300,000 tokens summed across inputs per request.
    default_max_inputs = 2048
    default_max_tokens = 300_000
    default_base_url = "https://api.openai.com/v1"

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": model, "input": texts, "encoding_format": encoding_format}
        if dimensions is not None:
            body["dimensions"] = dimensions
        return "embeddings", body

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        return _parse_data_list(payload), _usage(payload)


class OllamaWire(_WireBase):
    """Ollama's native POST {base}/api/embed, base e.g. http://localhost:11434."""

    provider = "ollama"
    # Ollama documents no per-request cap; it embeds a request's inputs within the model's
    # context on one machine, so we keep requests as small as TEI's defaults (a local CPU
    # server answers 32 short inputs well inside the 60 s timeout).
    default_max_inputs = 32
    default_max_tokens = 16_384
    default_base_url = "http://localhost:11434"

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {"model": model, "input": texts, "truncate": False}
        if dimensions is not None:
            body["dimensions"] = dimensions
        return "api/embed", body

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        usage = {}
        if "prompt_eval_count" in payload:
            usage["prompt_tokens"] = int(payload["prompt_eval_count"])
        return decode_vectors(payload["embeddings"]), usage

    def classify(self, status: int, body: str) -> ErrorClass:
        # Ollama has answered an over-long input (truncate=false) with a 500.
        if status == 500 and _TOO_LARGE.search(error_message(body)):
            return "too_large"
        return super().classify(status, body)


class CohereWire(_WireBase):
    """Cohere v2 POST {base}/v2/embed, base https://api.cohere.com."""

    provider = "cohere"
    # Cohere API reference, Embed (v2): "Maximum number of texts per call is 96". No total-token
    # cap is documented; 96 x 512 (the v3 models' input length) keeps requests moderate.
    default_max_inputs = 96
    default_max_tokens = 96 * 512
    default_base_url = "https://api.cohere.com"
    _INPUT_TYPES: ClassVar[dict[str, str]] = {
        "document": "search_document",
        "query": "search_query",
    }

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": model,
            "texts": texts,
            "input_type": self._INPUT_TYPES[input_type],
            "embedding_types": ["float"],
            "truncate": "NONE",
        }
        if dimensions is not None:
            body["output_dimension"] = dimensions
        return "v2/embed", body

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        units = (payload.get("meta") or {}).get("billed_units") or {}
        usage = {"prompt_tokens": int(units["input_tokens"])} if "input_tokens" in units else {}
        return decode_vectors(payload["embeddings"]["float"]), usage


class VoyageWire(_WireBase):
    """Voyage POST {base}/embeddings, base https://api.voyageai.com/v1."""

    provider = "voyage"
    # docs.voyageai.com/reference/embeddings-api: at most 1,000 inputs, and at most 120K tokens
    # in total for voyage-3-large/-code-3/-finance-2/-law-2 (320K or 1M for smaller models);
    # the smallest cap is the safe default.
    default_max_inputs = 1000
    default_max_tokens = 120_000
    default_base_url = "https://api.voyageai.com/v1"

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": model,
            "input": texts,
            "input_type": input_type,
            "truncation": False,
        }
        if dimensions is not None:
            body["output_dimension"] = dimensions
        if encoding_format == "base64":
            body["encoding_format"] = "base64"
        return "embeddings", body

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        return _parse_data_list(payload), _usage(payload)


class JinaWire(_WireBase):
    """Jina POST {base}/embeddings, base https://api.jina.ai/v1."""

    provider = "jina"
    # Jina's API reference (api.jina.ai/openapi.json) publishes rate limits (free tier: 500 RPM,
    # 1M TPM) but no per-request item cap we could confirm; 128 inputs / 64K tokens keeps one
    # request a small share of a minute's budget.
    default_max_inputs = 128
    default_max_tokens = 65_536
    default_base_url = "https://api.jina.ai/v1"
    _TASKS: ClassVar[dict[str, str]] = {"document": "retrieval.passage", "query": "retrieval.query"}

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": model,
            "input": texts,
            "task": self._TASKS[input_type],
            "embedding_type": "float",
            "normalized": True,
            "truncate": False,
        }
        if dimensions is not None:
            body["dimensions"] = dimensions
        return "embeddings", body

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        return _parse_data_list(payload), _usage(payload)


class TEIWire(_WireBase):
    """Hugging Face text-embeddings-inference native POST {base}/embed (self-hosted)."""

    provider = "tei"
    # text-embeddings-router defaults: --max-client-batch-size 32, --max-batch-tokens 16384.
    default_max_inputs = 32
    default_max_tokens = 16_384

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        # TEI serves one model (the route takes no model name); query prompts depend on the
        # model's own prompt names, so both input types are sent alike.
        return "embed", {"inputs": texts, "normalize": True, "truncate": False}

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        return decode_vectors(payload), {}

    def classify(self, status: int, body: str) -> ErrorClass:
        # TEI: 413 validation (batch or input too large), 422 tokenizer error (one input),
        # 424 backend error (transient), 400 empty input.
        if status == 424:
            return "retry"
        if status == 422 or (status == 400 and "empty" in error_message(body).lower()):
            return "rejected_input"
        return super().classify(status, body)


WIRE_FORMATS: dict[str, WireFormat] = {
    wire.provider: wire
    for wire in (OpenAIWire(), OllamaWire(), CohereWire(), VoyageWire(), JinaWire(), TEIWire())
}
