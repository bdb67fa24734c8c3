"""What a provider's wire format is (one class per provider in providers.py), and the state one
embedding call shares across the threads of its batches."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

InputType = Literal["document", "query"]


PROBE_TEXT = "dimension probe"  # harmless input: sent to learn the dimension or the config


class WireFormat(Protocol):
    """One provider's request/response shapes (implementations: providers.py)."""

    provider: str
    default_max_inputs: int
    default_max_tokens: int

    def request(
        self,
        model: str,
        texts: list[str],
        input_type: InputType,
        dimensions: int | None,
        encoding_format: str,
    ) -> tuple[str, dict]:
        """(path relative to the base URL, JSON body)."""
        ...

    def parse(self, payload: Any, expected: int) -> tuple[np.ndarray, dict]:
        """(vectors (n, d) float32 in input order, usage counts; may be empty)."""
        ...

    def classify(
        self, status: int, body: str
    ) -> Literal["retry", "too_large", "rejected_input", "fatal"]: ...


@dataclass
class Call:
    """One embed_documents_partial/embed_query call, shared by its batches' threads."""

    input_type: InputType
    dim: int
    stop: threading.Event = field(default_factory=threading.Event)
