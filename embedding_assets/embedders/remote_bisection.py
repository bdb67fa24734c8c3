"""Narrowing a bad answer down to its input: too large, rejected, 400/422 and unusable answers
bisect a batch until the offending input is alone; a batch that times out is split once per
half; a harmless probe tells a configuration error from a bad input."""

from __future__ import annotations

import numpy as np

from embedding_assets.embedders.base import (
    InputFailure,
)
from embedding_assets.embedders.remote_errors import (
    REASON_CHARS,
    BadOutput,
    BadRequest,
    EmbedderConfigError,
    EmbeddingFailed,
    Rejected,
    Stopped,
    TooLarge,
    Transient,
)
from embedding_assets.embedders.wire import PROBE_TEXT, Call


class Bisection:
    """How a batch's failures are narrowed down to inputs (a mixin of RemoteEmbedder)."""

    def _embed_group(
        self,
        call: Call,
        texts: list[str],
        counts: list[int],
        idx: list[int],
        *,
        once_on_timeout: bool = False,
    ) -> tuple[dict[int, np.ndarray], dict[int, InputFailure]]:
        """Embed texts[idx], narrowing every bad answer down to the inputs it is about.

        Too large, rejected, any other 400/422 and unusable answers bisect the group until the
        offending input is alone; a group that times out is split by ``_split_slow``.
        ``once_on_timeout``: a timeout is not retried but raised (``_split_slow`` decides).
        """
        if call.stop.is_set():
            raise Stopped
        try:
            vectors = self._send(
                [texts[i] for i in idx],
                sum(counts[i] for i in idx),
                call.input_type,
                dimension=call.dim,
                retry_timeouts=not once_on_timeout,
            )
        except (TooLarge, Rejected, BadRequest, BadOutput) as exc:
            if len(idx) == 1:
                return {}, {idx[0]: self._single_failure(call, exc)}
            mid = len(idx) // 2
            ok, bad = self._embed_group(call, texts, counts, idx[:mid])
            ok2, bad2 = self._embed_group(call, texts, counts, idx[mid:])
            return {**ok, **ok2}, {**bad, **bad2}
        except Transient as exc:  # retries exhausted
            if exc.timed_out and once_on_timeout:
                raise
            if exc.timed_out and len(idx) > 1:
                return self._split_slow(call, texts, counts, idx, exc)
            # 5xx / 429 / connection: an outage, not an input; these fail, the call goes on.
            failure = InputFailure("transient", f"gave up after retries: {exc}"[:REASON_CHARS])
            return {}, dict.fromkeys(idx, failure)
        ok: dict[int, np.ndarray] = {}
        bad: dict[int, InputFailure] = {}
        norms = np.linalg.norm(vectors, axis=1)
        for i, vector, norm in zip(idx, vectors, norms, strict=True):
            if not np.isfinite(norm) or norm == 0:
                bad[i] = InputFailure(
                    "bad_output", "the provider returned a NaN or all-zero vector"
                )
            else:
                ok[i] = vector / norm  # providers normalize; this makes it a guarantee
        with self._stats_lock:
            self._stats.tokens += sum(counts[i] for i in ok)
        return ok, bad

    def _split_slow(
        self,
        call: Call,
        texts: list[str],
        counts: list[int],
        idx: list[int],
        timeout: Transient,
    ) -> tuple[dict[int, np.ndarray], dict[int, InputFailure]]:
        """texts[idx] timed out (after its retries): send each half once, recurse into the
        halves that time out again; both halves timing out means a slow service: all fail."""
        mid = len(idx) // 2
        ok: dict[int, np.ndarray] = {}
        bad: dict[int, InputFailure] = {}
        slow: list[tuple[list[int], Transient]] = []
        for half in (idx[:mid], idx[mid:]):
            try:
                half_ok, half_bad = self._embed_group(
                    call, texts, counts, half, once_on_timeout=True
                )
            except Transient as exc:  # timed out again (raised only for timeouts)
                slow.append((half, exc))
                continue
            ok.update(half_ok)
            bad.update(half_bad)
        if len(slow) == 2:
            failure = InputFailure("transient", f"gave up after retries: {timeout}"[:REASON_CHARS])
            return {}, dict.fromkeys(idx, failure)
        for half, exc in slow:
            if len(half) == 1:
                reason = f"timed out also when sent alone: {exc}"[:REASON_CHARS]
                bad[half[0]] = InputFailure("transient", reason)
            else:
                half_ok, half_bad = self._split_slow(call, texts, counts, half, exc)
                ok.update(half_ok)
                bad.update(half_bad)
        return ok, bad

    def _single_failure(self, call: Call, exc: Exception) -> InputFailure:
        """Why one input failed alone; raises if the configuration is at fault instead."""
        if isinstance(exc, TooLarge):
            return InputFailure("rejected", f"too large for the provider: {exc}"[:REASON_CHARS])
        if isinstance(exc, (BadRequest, BadOutput)) and not self._answered_ok:
            self._check_config(call)
        kind = "bad_output" if isinstance(exc, BadOutput) else "rejected"
        return InputFailure(kind, str(exc)[:REASON_CHARS])

    def _check_config(self, call: Call) -> None:
        """Before the first good answer, one input's 400 or unusable answer may be the
        configuration's (unknown model, wrong `dimensions`): a harmless text failing the same
        way proves it. One probe per embedder, unless it gets no verdict (transient)."""
        with self._probe_lock:
            if call.stop.is_set():
                raise Stopped
            if self._answered_ok:  # another thread's probe or batch answered meanwhile
                return
            try:
                self._send([PROBE_TEXT], 2, call.input_type, dimension=call.dim)
            except BadRequest as probe:
                call.stop.set()  # before the lock is released: no other batch probes again
                raise EmbedderConfigError(
                    self._fatal_message(probe.status, probe.url, probe.detail)
                ) from None
            except BadOutput as probe:
                call.stop.set()
                raise EmbeddingFailed(probe.config_message) from None
            except (Transient, TooLarge, Rejected):
                pass  # no verdict: the input's own failure stands
