"""Tokenizers for chunking text sent to remote embedders: the model's own (Hugging Face
tokenizer.json), tiktoken for OpenAI models, or an estimate that never undercounts much."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from embedding_assets.embedders.base import (
    HFTokenizer,
    Tokenizer,
)

_PIECES = re.compile(r"(?P<word>[A-Za-z0-9_]+)|\S")


class EstimatingTokenizer:
    """Over-counting token estimate for providers whose tokenizer is not available offline.

    Chunks are cut to ``max_input_tokens`` of *this* count, so it must not under-count what
    the provider will count, or the provider rejects (or truncates) the chunk:

    - an ASCII word (letters, digits, ``_``) costs one token per 3 characters, rounded up:
      BPE/WordPiece vocabularies of the hosted models average about 4 characters per token
      for English and code, and split digit runs into groups of at most 3;
    - every other non-space character costs its UTF-8 length in tokens: byte-level BPE never
      needs more than one token per byte, so punctuation costs 1 and a CJK character 3;
    - whitespace costs nothing (merged into the next token).

    It is not a hard bound for random ASCII strings (hashes, base64 blobs tokenize at ~2
    characters per token); if such a chunk is too long for the provider, that input alone
    fails with the provider's reason. For exact counts give a tokenizer spec (``hf:...``).
    """

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        for match in _PIECES.finditer(text):
            start, end = match.span()
            if match.lastgroup == "word":
                spans.extend((s, min(s + 3, end)) for s in range(start, end, 3))
            else:  # one token per UTF-8 byte, all spanning the character
                spans.extend([(start, end)] * len(match.group().encode("utf-8", "surrogatepass")))
        return spans

    def count(self, text: str) -> int:
        return len(self.encode_offsets(text))

    def __repr__(self) -> str:
        return "EstimatingTokenizer()"


class TiktokenTokenizer:
    """A tiktoken encoding as a chunking ``Tokenizer`` (only if its file loads offline)."""

    def __init__(self, encoding: Any) -> None:
        self._enc = encoding

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        _, starts = self._enc.decode_with_offsets(self._enc.encode_ordinary(text))
        ends = [*starts[1:], len(text)]
        # Tokens that start inside one character share its start: give each a non-empty span.
        return [(s, max(e, s + 1)) for s, e in zip(starts, ends, strict=True)]

    def count(self, text: str) -> int:
        return len(self._enc.encode_ordinary(text))


_MINILM = re.compile(r"(^|/)all-minilm-l6-v2$|^all-minilm(:(latest|22m|l6-v2))?$")


def tokenizer_for(provider: str, model: str, tokenizer_spec: str | None = None) -> Tokenizer:
    """The tokenizer that chunks text for a remote model.

    ``tokenizer_spec``: ``"hf:<tokenizer.json or the folder holding it>"``,
    ``"tiktoken:<encoding>"`` (needs the ``tiktoken`` package and its encoding file available
    offline) or ``"estimate"``. Without a spec: the bundled all-MiniLM-L6-v2 tokenizer when the
    service runs that open model (our worker, Infinity, TEI, Ollama's ``all-minilm``), else
    ``EstimatingTokenizer``. tiktoken is not the default for OpenAI models: it downloads its
    encoding files on first use, which this deployment cannot do.
    """
    if tokenizer_spec:
        kind, _, arg = tokenizer_spec.partition(":")
        if kind == "estimate" and not arg:
            return EstimatingTokenizer()
        if kind == "hf" and arg:
            path = Path(arg).expanduser()
            return HFTokenizer.from_file(path / "tokenizer.json" if path.is_dir() else path)
        if kind == "tiktoken" and arg:
            return _load_tiktoken(arg)
        raise ValueError(
            f"tokenizer spec {tokenizer_spec!r} not understood: use 'hf:<path to tokenizer.json "
            "or its folder>', 'tiktoken:<encoding name>' or 'estimate'"
        )
    if _MINILM.search(model.strip().lower()):
        from embedding_assets.embedders.sentence_transformers import resolve_model_dir

        folder, _ = resolve_model_dir("all-MiniLM-L6-v2")
        return HFTokenizer.from_file(folder / "tokenizer.json")
    return EstimatingTokenizer()


def _load_tiktoken(encoding: str) -> TiktokenTokenizer:
    try:
        import tiktoken
    except ImportError as exc:
        raise ValueError(
            f"tokenizer 'tiktoken:{encoding}' needs the tiktoken package (`pip install "
            "tiktoken`); or use 'estimate' or an 'hf:' tokenizer.json"
        ) from exc
    try:
        return TiktokenTokenizer(tiktoken.get_encoding(encoding))
    except Exception as exc:  # tiktoken raises requests/OS errors when it cannot download
        raise ValueError(
            f"tiktoken could not load encoding {encoding!r} ({type(exc).__name__}): it downloads "
            "encoding files on first use; pre-populate TIKTOKEN_CACHE_DIR, or use 'estimate' "
            "or an 'hf:' tokenizer.json"
        ) from exc
