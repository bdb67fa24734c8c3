"""One request to an embedding service, with retries: tenacity's exponential backoff with jitter,
Retry-After honoured exactly, failover to another base URL at once, bounded attempts and a
deadline per batch, and the answer checked before it is used."""

from __future__ import annotations

import logging
import os

import httpx
import numpy as np
import tenacity

from embedding_assets.embedders.remote_errors import (
    REASON_CHARS,
    BadOutput,
    BadRequest,
    EmbedderConfigError,
    Rejected,
    TooLarge,
    Transient,
    display_url,
    parse_retry_after,
    short,
)
from embedding_assets.embedders.telemetry import embedder_call
from embedding_assets.embedders.wire import InputType

# Requests of the live lane's process carry this header; our worker serves them before bulk
# requests (other services ignore it). Set once per process by `mark_live_requests`.
PRIORITY_HEADER = "X-Embedding-Priority"
LIVE_PRIORITY = "live"
_priority: str | None = None


def mark_live_requests() -> None:
    """Every request this process sends from now on is the live lane's."""
    global _priority
    _priority = LIVE_PRIORITY


logger = logging.getLogger(__name__)


class HttpRequests:
    """Sending one batch (a mixin of RemoteEmbedder)."""

    def _send(
        self,
        texts: list[str],
        tokens: int,
        input_type: InputType,
        *,
        dimension: int | None,
        retry_timeouts: bool = True,
    ) -> np.ndarray:
        def retryable(exc: BaseException) -> bool:
            return isinstance(exc, Transient) and (retry_timeouts or not exc.timed_out)

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(retryable),
            stop=(
                tenacity.stop_after_attempt(self.max_attempts)
                | tenacity.stop_before_delay(self.batch_deadline_s)
            ),
            wait=self._wait,
            before_sleep=self._before_sleep,
            reraise=True,
        )
        return retrying(self._attempt, texts, tokens, input_type, dimension)

    def _wait(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, Transient) and exc.retry_after is not None:
            return exc.retry_after  # the server said when: exactly that
        if isinstance(exc, Transient) and exc.failover:
            return 0.0
        return self._backoff(state)

    def _before_sleep(self, state: tenacity.RetryCallState) -> None:
        with self._stats_lock:
            self._stats.retries += 1
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        logger.warning(
            "%s: %s; attempt %d of %d, retrying in %.2f s",
            self.model_id,
            exc,
            state.attempt_number,
            self.max_attempts,
            wait,
        )

    def _attempt(
        self, texts: list[str], tokens: int, input_type: InputType, dimension: int | None
    ) -> np.ndarray:
        waited = self._limits.acquire(tokens)
        path, body = self.wire.request(
            self.model, texts, input_type, self.dimensions_param, self.encoding_format
        )
        base = self._endpoints.pick()
        url = f"{base}/{path.lstrip('/')}"
        with self._stats_lock:
            self._stats.requests += 1
            self._stats.throttled_seconds += waited
        with embedder_call(self.wire.provider, self.model, tokens):
            try:
                response = self._client.post(url, json=body, headers=self._headers())
            except httpx.TimeoutException as exc:
                raise Transient(
                    f"timed out: no answer within {self.timeout_s} s from {display_url(url)} "
                    f"({type(exc).__name__})",
                    failover=self._endpoints.mark_down(base),
                    # The request went out: one slow input may be the cause (a connect or pool
                    # timeout is about the service, not the inputs).
                    timed_out=isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)),
                ) from None
            except httpx.TransportError as exc:  # no exception text: it could quote the request
                raise Transient(
                    f"connection to {display_url(url)} failed ({type(exc).__name__})",
                    failover=self._endpoints.mark_down(base),
                ) from None
            if response.status_code >= 400:
                self._raise_for(response, base, url)
            self._endpoints.mark_up(base)
            shown = display_url(url)
            try:
                vectors, usage = self.wire.parse(response.json(), len(texts))
            except (ValueError, KeyError, TypeError) as exc:
                problem = f"unreadable response from {shown}: {self._redact(str(exc))}"
                raise BadOutput(
                    problem[:REASON_CHARS], f"{self.model_id}: {problem}"[:REASON_CHARS]
                ) from None
            if vectors.ndim != 2 or vectors.shape[0] != len(texts):
                problem = f"{shown} returned {vectors.shape[0]} vectors for {len(texts)} inputs"
                raise BadOutput(
                    problem[:REASON_CHARS],
                    f"{self.model_id}: {problem}; nothing from this response is used",
                )
            if dimension is not None and vectors.shape[1] != dimension:
                problem = (
                    f"{shown} returned vectors of length {vectors.shape[1]}, expected {dimension}"
                )
                raise BadOutput(
                    problem[:REASON_CHARS],
                    f"{self.model_id}: {problem}; check the model, `dimension` and `dimensions` "
                    "settings (nothing from this response is stored)",
                )
        self._answered_ok = True
        with self._stats_lock:
            self._stats.usage_prompt_tokens += usage.get("prompt_tokens", 0)
            self._stats.usage_total_tokens += usage.get(
                "total_tokens", usage.get("prompt_tokens", 0)
            )
        return vectors

    def _raise_for(self, response: httpx.Response, base: str, url: str) -> None:
        status = response.status_code
        text = self._redact(response.text)
        kind = self.wire.classify(status, text)
        detail = short(text)
        if kind == "retry":
            # A failing server is cooled off; a throttling one (429) is only waited for.
            failover = status >= 500 and self._endpoints.mark_down(base)
            raise Transient(
                f"HTTP {status} from {display_url(url)}: {detail}",
                retry_after=parse_retry_after(response.headers),
                failover=failover,
            )
        if kind == "too_large":
            raise TooLarge(f"HTTP {status}: {detail}")
        if kind == "rejected_input":
            raise Rejected(f"HTTP {status}: {detail}")
        if status in (400, 422):  # no known wording: bisected like a rejected input
            raise BadRequest(status, display_url(url), detail)
        raise EmbedderConfigError(self._fatal_message(status, display_url(url), detail))

    def _fatal_message(self, status: int, url: str, detail: str) -> str:
        head = f"{self.model_id}: {url} answered HTTP {status} ({detail})."
        if status in (401, 403):
            if self.api_key_env:
                return (
                    f"{head} The API key was refused: set the environment variable "
                    f"{self.api_key_env} to a valid key for {self.wire.provider}."
                )
            return (
                f"{head} The service wants an API key: set `api_key_env` to the name of the "
                "environment variable that holds it."
            )
        if status == 404:
            return (
                f"{head} Check the base URL (the API root, without the endpoint path) and that "
                f"the model {self.model!r} exists on this service."
            )
        return f"{head} Check the model name and the dimensions/provider settings."

    def _headers(self) -> dict[str, str]:
        key = self._api_key
        if key is None and self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise EmbedderConfigError(
                    f"{self.model_id}: the environment variable {self.api_key_env} is not set; "
                    f"it must hold the API key for {self.wire.provider}."
                )
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if _priority is not None:
            headers[PRIORITY_HEADER] = _priority
        return headers

    def _redact(self, text: str) -> str:
        key = self._api_key or (os.environ.get(self.api_key_env) if self.api_key_env else None)
        return text.replace(key, "***") if key else text
