"""Limits shared by every thread of the process: requests per second and tokens per minute per
embedder name (pyrate-limiter token buckets), and round-robin over base URLs with a cool-off for
one that fails."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence

import pyrate_limiter


class RateLimits:
    """requests/second and tokens/minute token buckets (GCRA: one number of state each)."""

    def __init__(self, requests_per_second: float | None, tokens_per_minute: int | None) -> None:
        self.config = (requests_per_second, tokens_per_minute)
        self._requests = self._tokens = None
        if requests_per_second:
            # limit/interval as integers: rps*1000 per 1000 s; burst of one second's worth.
            rate = pyrate_limiter.Rate(
                max(1, round(requests_per_second * 1000)),
                1_000_000,
                burst=max(1, int(requests_per_second)),
            )
            self._requests = self._limiter(rate)
        if tokens_per_minute:
            self.tokens_per_minute = int(tokens_per_minute)
            rate = pyrate_limiter.Rate(self.tokens_per_minute, pyrate_limiter.Duration.MINUTE)
            self._tokens = self._limiter(rate)

    @staticmethod
    def _limiter(rate: pyrate_limiter.Rate) -> pyrate_limiter.Limiter:
        bucket = pyrate_limiter.StateBucket([rate], algorithm=pyrate_limiter.TokenBucket())
        # A state bucket has nothing to leak: no background leaker thread per limiter.
        factory = pyrate_limiter.SingleBucketFactory(bucket, schedule_leak=False)
        return pyrate_limiter.Limiter(factory, buffer_ms=5)

    def acquire(self, tokens: int) -> float:
        """Block until one request of ``tokens`` tokens may go; returns the seconds waited."""
        start = time.monotonic()
        if self._requests is not None:
            self._requests.try_acquire("requests")
        if self._tokens is not None and tokens > 0:
            # A request larger than a minute's budget would never fit: it takes the whole minute.
            self._tokens.try_acquire("tokens", weight=min(tokens, self.tokens_per_minute))
        return time.monotonic() - start


LIMITS_LOCK = threading.Lock()


def shared_limits(name: str, rps: float | None, tpm: int | None) -> RateLimits:
    with LIMITS_LOCK:
        limits = _LIMITS.get(name)
        if limits is None or limits.config != (rps, tpm):
            limits = _LIMITS[name] = RateLimits(rps, tpm)
        return limits


class Endpoints:
    def __init__(self, urls: Sequence[str], cooloff_s: float) -> None:
        self.urls = [u.rstrip("/") for u in urls]
        self._cooloff_s = cooloff_s
        self._down_until: dict[str, float] = {}
        self._turn = itertools.count()
        self._lock = threading.Lock()

    def pick(self) -> str:
        with self._lock:
            now = time.monotonic()
            up = [u for u in self.urls if self._down_until.get(u, 0.0) <= now]
            if not up:  # all cooling off: try the one that comes back first rather than none
                return min(self.urls, key=lambda u: self._down_until[u])
            return up[next(self._turn) % len(up)]

    def mark_down(self, url: str) -> bool:
        """Cool ``url`` off; True if another URL is up to fail over to."""
        with self._lock:
            now = time.monotonic()
            self._down_until[url] = now + self._cooloff_s
            return any(self._down_until.get(u, 0.0) <= now for u in self.urls)

    def mark_up(self, url: str) -> None:
        if url in self._down_until:
            with self._lock:
                self._down_until.pop(url, None)


_LIMITS: dict[str, RateLimits] = {}
