"""The embedder protocol and the fast-tokenizer wrapper shared by embedders.

No Dagster and no torch here: chunking, dimension lookups and config validation must stay
cheap (importing sentence-transformers costs 6-11 s per process on this machine).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np

from embedding_assets.core.chunking import Tokenizer

if TYPE_CHECKING:
    import tokenizers

__all__ = [
    "Embedder",
    "FailureKind",
    "HFTokenizer",
    "InputFailure",
    "Tokenizer",
    "check_embeddings",
]

# Why one input could not be embedded:
# - rejected: the provider refused this input (content filter, too large, any 400 it alone gets);
# - transient: no good answer within the retries (timeout, 5xx, 429, connection);
# - bad_output: the provider answered, but not with a usable vector (wrong length, missing,
#   NaN or all-zero).
FailureKind = Literal["rejected", "transient", "bad_output"]


@dataclass(frozen=True)
class InputFailure:
    kind: FailureKind
    message: str  # the provider's reason, redacted and shortened; never a key

    def __str__(self) -> str:
        return self.message


@runtime_checkable
class Embedder(Protocol):
    """What the pipeline needs from any embedding provider (local or remote)."""

    # Stable identifier stored with every vector, e.g. "sentence_transformers:all-MiniLM-L6-v2".
    model_id: str

    @property
    def dimension(self) -> int: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    @property
    def max_input_tokens(self) -> int:
        """Longest input embedded without truncation, special tokens excluded."""
        ...

    def embed_documents(self, texts: Sequence[str]) -> np.ndarray:
        """float32 array (len(texts), dimension), rows L2-normalized, in input order."""
        ...

    def embed_query(self, text: str) -> np.ndarray:
        """float32 array (dimension,), L2-normalized."""
        ...


class HFTokenizer:
    """A Hugging Face fast tokenizer (``tokenizers`` package) as a chunking ``Tokenizer``.

    Truncation and padding configured in tokenizer.json are disabled: chunking needs the true
    token count of the whole text (the bundled MiniLM file truncates/pads to 128 otherwise).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        import tokenizers  # local import: only the embedders that need it pay for it

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        return cls(tokenizers.Tokenizer.from_file(str(path)))

    @property
    def num_special_tokens(self) -> int:
        """Special tokens the model adds around a single input ([CLS] ... [SEP] -> 2)."""
        return int(self._tok.num_special_tokens_to_add(False))

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        return [
            (int(s), int(e)) for s, e in self._tok.encode(text, add_special_tokens=False).offsets
        ]

    def encode_offsets_batch(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        """`encode_offsets` of many texts in one Rust-side batch."""
        if not texts:
            return []
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [[(int(s), int(e)) for s, e in encoding.offsets] for encoding in encodings]

    def count(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def count_batch(self, texts: Sequence[str]) -> list[int]:
        """Token counts of many texts at once (Rust-side batch, much faster than a loop)."""
        if not texts:
            return []
        # encode_batch_fast skips offset tracking (tokenizers >= 0.21); fall back if absent.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [len(e.ids) for e in encodings]


def check_embeddings(vectors: np.ndarray, n: int, dimension: int, model_id: str) -> np.ndarray:
    """Validate an embedder's output: shape, finite values, non-zero rows; returns float32."""
    arr = np.asarray(vectors, dtype=np.float32)
    if arr.shape != (n, dimension):
        raise ValueError(
            f"{model_id}: expected embeddings of shape ({n}, {dimension}), got {arr.shape}"
        )
    if n and not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1)).tolist()
        raise ValueError(f"{model_id}: NaN/inf in embeddings of inputs {bad[:10]}")
    if n and not (np.abs(arr).sum(axis=1) > 0).all():
        bad = np.flatnonzero(np.abs(arr).sum(axis=1) == 0).tolist()
        raise ValueError(f"{model_id}: all-zero embeddings for inputs {bad[:10]}")
    return arr
