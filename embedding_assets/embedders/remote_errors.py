"""What an embedding service's answer means: the errors a caller sees (configuration, failed
inputs), the outcomes of one request that the retry and bisection policies act on, and the
readable part of an error body."""

from __future__ import annotations

import email.utils
import json
import time
from urllib.parse import urlsplit

import httpx

from embedding_assets.embedders.base import (
    InputFailure,
)

REASON_CHARS = 300


class EmbedderConfigError(RuntimeError):
    """The provider refused the request for a reason retrying cannot fix (key, URL, model)."""


class EmbeddingFailed(ValueError):
    """Some inputs could not be embedded, or the provider answered with invalid vectors."""

    def __init__(self, message: str, failures: dict[int, InputFailure] | None = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


class Transient(Exception):
    """Worth retrying: 429, 5xx, connection error, timeout."""

    def __init__(
        self,
        reason: str,
        retry_after: float | None = None,
        failover: bool = False,
        timed_out: bool = False,
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.failover = failover  # another base URL is up: retry there at once
        self.timed_out = timed_out  # sent, but no answer in time: maybe one slow input


class TooLarge(Exception):
    pass


class Rejected(Exception):
    pass


class BadRequest(Exception):
    """A 400/422 of no known wording: one input at fault, or the configuration (model)."""

    def __init__(self, status: int, url: str, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status, self.url, self.detail = status, url, detail


class BadOutput(Exception):
    """An answer without usable vectors: wrong length or count, unreadable body.

    ``str()`` describes it for one input; ``config_message`` names the settings to check,
    for when every input gets such answers."""

    def __init__(self, message: str, config_message: str) -> None:
        super().__init__(message)
        self.config_message = config_message


class Stopped(Exception):
    """Another batch of the same call failed for good: send nothing more."""


def display_url(url: str) -> str:
    """scheme://host[:port]/path: no userinfo, query or fragment (where secrets could hide)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def error_message(body: str) -> str:
    """The human part of an error body: JSON ``error.message``/``message``/``detail``/``error``."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.strip()
    if isinstance(payload, dict):
        for key in ("error", "message", "detail"):
            value = payload.get(key)
            if isinstance(value, dict):
                value = value.get("message") or json.dumps(value)
            elif isinstance(value, list):  # FastAPI validation errors
                value = json.dumps(value)
            if value:
                return str(value)
    return body.strip()


def short(text: str) -> str:
    return " ".join(error_message(text).split())[:REASON_CHARS]
