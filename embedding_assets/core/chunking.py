"""Token-bounded chunking of a document's text.

Pure Python: no Dagster and no torch, so chunking stays cheap in any process (sensors, CLI,
checks). Token counts come from the *embedder's own tokenizer* so that a chunk never gets
silently truncated by the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """The part of a tokenizer chunking needs. Special tokens ([CLS], [SEP]...) are excluded."""

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span ``(start, end)`` in ``text`` of each token, in order."""
        ...

    def count(self, text: str) -> int:
        """Number of tokens of ``text``."""
        ...


# No tokenizer has real tokens this long: a longer span is a word it could not represent
# (WordPiece gives any word over its 100-character limit a single [UNK]). Such a word is
# broken with a space every LONG_TOKEN_CHARS characters before chunking, so its pieces are
# tokenized, chunked and embedded like other text.
LONG_TOKEN_CHARS = 100
# The version of the rules above that turn a row's text into chunk texts. Part of every
# generation's pipeline: raising it builds a new generation instead of mixing old and new
# chunks in one index.
TEXT_RULES_VERSION = 1


@dataclass(frozen=True)
class Chunk:
    chunk_index: int
    text: str
    token_count: int
    chunk_hash: str  # sha256 hex of text (utf-8): lets unchanged chunks reuse stored vectors


def chunk_hash_of(text: str) -> str:
    """Stable content hash of a chunk's text (sha256 hex of its UTF-8 bytes)."""
    # surrogatepass: never raise on odd input; for valid text it is plain UTF-8.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def validate_chunking(max_tokens: int, overlap: int) -> None:
    """Raise ValueError naming the bad value and how to fix it."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(
            f"max_tokens must be an integer >= 1, got {max_tokens!r}; set it to e.g. 256."
        )
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"overlap must be an integer >= 0, got {overlap!r}; use 0 for no overlap.")
    if overlap >= max_tokens:
        raise ValueError(
            f"overlap ({overlap}) must be smaller than max_tokens ({max_tokens}), otherwise the "
            f"window never advances; lower overlap (e.g. to {max_tokens // 8}) or raise max_tokens."
        )


def chunk_text(text: str, tokenizer: Tokenizer, max_tokens: int, overlap: int) -> list[Chunk]:
    """Split ``text`` into windows of at most ``max_tokens`` tokens sharing ``overlap`` tokens.

    The document is stripped of leading/trailing whitespace; each chunk's text is then the
    verbatim slice from its first token's start to its last token's end. Windows advance by
    ``max_tokens - overlap`` tokens. Re-tokenizing a slice can give more tokens than the
    window held (a word cut at a boundary, several tokens sharing one character), so each
    chunk is re-counted and its window shrunk until it fits; ``token_count`` is that re-count.
    Text without any token (empty, whitespace, only characters the tokenizer drops) gives [].
    A word the tokenizer cannot represent is broken into pieces first (`break_long_words`).
    """
    return chunk_texts([text], tokenizer, max_tokens, overlap)[0]


def chunk_texts(
    texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int, overlap: int
) -> list[list[Chunk]]:
    """`chunk_text` of many texts, tokenized in one batch when the tokenizer offers
    ``encode_offsets_batch`` (a Rust-side batch on all cores, instead of one call per text)."""
    validate_chunking(max_tokens, overlap)
    docs = [text.strip() for text in texts]
    batch = getattr(tokenizer, "encode_offsets_batch", None)
    if batch is not None:
        offsets = batch(docs)
    else:
        offsets = [tokenizer.encode_offsets(doc) if doc else [] for doc in docs]
    chunks = []
    for doc, spans in zip(docs, offsets, strict=True):
        broken = break_long_words(doc, spans)
        if broken is not None:
            doc, spans = broken, tokenizer.encode_offsets(broken)
        chunks.append(_windows(doc, spans, tokenizer, max_tokens, overlap) if doc else [])
    return chunks


def break_long_words(doc: str, offsets: list[tuple[int, int]]) -> str | None:
    """`doc` with every token span longer than LONG_TOKEN_CHARS broken by a space every
    LONG_TOKEN_CHARS characters; None when it has none (the common case: the text is kept
    as it is)."""
    long_spans = sorted({(s, e) for s, e in offsets if e - s > LONG_TOKEN_CHARS})
    if not long_spans:
        return None
    parts: list[str] = []
    position = 0
    for start, end in long_spans:
        if start < position:  # overlaps a span already broken
            continue
        parts.append(doc[position:start])
        parts.append(
            " ".join(
                doc[i : min(i + LONG_TOKEN_CHARS, end)] for i in range(start, end, LONG_TOKEN_CHARS)
            )
        )
        position = end
    parts.append(doc[position:])
    return "".join(parts)


def _windows(
    doc: str, offsets: list[tuple[int, int]], tokenizer: Tokenizer, max_tokens: int, overlap: int
) -> list[Chunk]:
    n = len(offsets)
    if n == 0:
        return []
    if n <= max_tokens:
        # Common case (short rows): one chunk; the offsets are the whole doc's own tokens.
        return [Chunk(0, doc, n, chunk_hash_of(doc))]

    chunks: list[Chunk] = []
    start = 0
    while True:
        end = min(start + max_tokens, n)  # window = tokens[start:end]
        while True:
            piece = _slice(doc, offsets, start, end)
            count = tokenizer.count(piece)
            if count <= max_tokens:
                break
            if end - start == 1:
                raise ValueError(
                    f"max_tokens={max_tokens} is too small for this tokenizer: the single token "
                    f"span {piece!r} re-tokenizes into {count} tokens; raise max_tokens."
                )
            # Shrink by the excess (at least one token) so long windows converge quickly.
            end = max(start + 1, end - max(1, count - max_tokens))
        chunks.append(Chunk(len(chunks), piece, count, chunk_hash_of(piece)))
        if end >= n:
            return chunks
        # Next window starts `overlap` tokens before this one ended. For a full window this is
        # exactly `start + max_tokens - overlap`; after a shrink it keeps both overlap and
        # coverage (never skips a token). `start + 1` guarantees progress.
        start = max(start + 1, end - overlap)


def _slice(doc: str, offsets: list[tuple[int, int]], start: int, end: int) -> str:
    # min/max instead of first/last: some tokenizers give several tokens one shared span, or
    # (rarely) spans that are not monotonic.
    window = offsets[start:end]
    lo = min(s for s, _ in window)
    hi = max(e for _, e in window)
    return doc[lo:hi]
