"""Group inputs into request batches bounded by input count and token count.

Pure Python: no Dagster, no HTTP. Remote embedding APIs cap both how many inputs one request
may carry and how many tokens they may add up to (OpenAI: 2048 inputs / 300,000 tokens); a
batch must respect both or the provider rejects it whole.
"""

from __future__ import annotations

from collections.abc import Sequence

# A local model's batches: at most this many texts and padded tokens. For short texts on
# this 2-core CPU, budgets of 1,536-4,096 tokens ran within noise of fixed batches of 32
# (MiniLM 1.5-1.67x a bare encode either way; 8,192 was slower); the budget bounds a batch
# of long texts (8 of 256 tokens) and keeps short ones from being padded to a long one.
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_BATCH_TOKENS = 2048


def token_batches(token_counts: Sequence[int], max_inputs: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``token_counts`` grouped, in order, into batches under both limits.

    Every index appears exactly once and batches keep input order (concatenated they give
    ``0..n-1``). A batch holds at most ``max_inputs`` indices whose counts sum to at most
    ``max_tokens``.

    An input that alone exceeds ``max_tokens`` gets a batch of its own: it cannot be split
    here (it is one text), and refusing the whole call would block every other input. The
    chunker, which cuts texts to the embedder's ``max_input_tokens``, normally prevents it;
    when it happens anyway the provider answers "too large" for that one request and only that
    input fails.
    """
    _require_positive_int("max_inputs", max_inputs)
    _require_positive_int("max_tokens", max_tokens)
    batches: list[list[int]] = []
    current: list[int] = []
    current_tokens = 0
    for i, count in enumerate(token_counts):
        if count < 0:
            raise ValueError(f"token count of input {i} is negative ({count})")
        if current and (len(current) >= max_inputs or current_tokens + count > max_tokens):
            batches.append(current)
            current, current_tokens = [], 0
        current.append(i)
        current_tokens += count
    if current:
        batches.append(current)
    return batches


def padded_batches(
    token_counts: Sequence[int], max_inputs: int, max_padded_tokens: int
) -> list[list[int]]:
    """Indices of ``token_counts`` sorted by count and grouped into batches for a local model,
    which pads every input of a batch to the batch's longest: a batch holds at most
    ``max_inputs`` indices and at most ``max_padded_tokens`` tokens once padded
    (``len(batch) * longest``). Every index appears exactly once; equal counts keep input
    order. Short texts thus share large batches and long ones small batches, so the model
    computes few padding tokens and keeps its matrices a cache-friendly size."""
    _require_positive_int("max_inputs", max_inputs)
    _require_positive_int("max_padded_tokens", max_padded_tokens)
    order = sorted(range(len(token_counts)), key=token_counts.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending: the input added now is the batch's longest.
        if current and (
            len(current) >= max_inputs or (len(current) + 1) * token_counts[i] > max_padded_tokens
        ):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def _require_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
