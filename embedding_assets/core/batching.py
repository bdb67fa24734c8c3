"""Group inputs into request batches bounded by input count and token count.

Pure Python: no Dagster, no HTTP. Remote embedding APIs cap both how many inputs one request
may carry and how many tokens they may add up to (OpenAI: 2048 inputs / 300,000 tokens); a
batch must respect both or the provider rejects it whole.
"""

from __future__ import annotations

from collections.abc import Sequence


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
    if isinstance(max_inputs, bool) or not isinstance(max_inputs, int) or max_inputs < 1:
        raise ValueError(f"max_inputs must be an integer >= 1, got {max_inputs!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
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
