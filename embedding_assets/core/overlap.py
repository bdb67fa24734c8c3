"""Two stages over a sequence of keys, overlapped: `prepare` runs on a helper thread, one key
ahead, while the caller's thread `finish`es the previous key. For a run of many shards: the
next shard is read, chunked and embedded while the last one is written and checked, so the
embedder is kept busy across shards and the writes (Postgres, Qdrant) hide behind it.

At most two keys are in flight (one prepared or being prepared, one being finished), so
memory stays that of two shards. `finish` runs on the caller's thread, in key order: what
must stay on one thread (an embedded store's session, event logging) stays there.
"""

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Finished:
    """A key's outcome: `value` what `finish` returned, or `error` what a stage raised
    (`stage` says which)."""

    key: str
    value: Any = None
    error: BaseException | None = None
    stage: str = "finish"


def overlapped(
    keys: list[str],
    prepare: Callable[[str], Any],
    finish: Callable[[str, Any], Any],
    before_prepare: Callable[[str], Any] | None = None,
) -> Iterator[Finished]:
    """Yield every key's outcome in order. `before_prepare(key)` runs on the caller's thread
    just before the key's `prepare` is handed to the helper (what must not leave the caller's
    thread); its result is passed to `prepare` instead of the key when given. A stage that
    raises ends that key, not the others."""
    if not keys:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as helper:

        def submit(key: str) -> Future:
            if before_prepare is None:
                return helper.submit(prepare, key)
            try:
                argument = before_prepare(key)
            except Exception as exc:  # noqa: BLE001 - reported as the key's outcome
                failed: Future = Future()
                failed.set_exception(exc)
                return failed
            return helper.submit(prepare, argument)

        upcoming = submit(keys[0])
        for index, key in enumerate(keys):
            current = upcoming
            try:
                prepared = current.result()
            except Exception as exc:  # noqa: BLE001
                prepared, error = None, exc
            else:
                error = None
            if index + 1 < len(keys):
                upcoming = submit(keys[index + 1])  # prepared while this key is finished
            if error is not None:
                yield Finished(key, error=error, stage="prepare")
                continue
            try:
                yield Finished(key, value=finish(key, prepared))
            except Exception as exc:  # noqa: BLE001
                yield Finished(key, error=exc)
