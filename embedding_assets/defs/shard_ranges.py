"""A run of a range of shards (a backfill under `BackfillPolicy.single_run()`): each asset's
output is a `ShardStream`, one value per shard, produced lazily by the IO manager that
stores it, so the run holds one shard's rows at a time, however many shards it covers.

Dagster gives every partition of a range run the same output metadata; the shards' own
figures go under `by_shard`, beside the run's totals, so no partition shows another
shard's figure under its own name.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import dagster as dg

Produce = Callable[[str], tuple[Any, dict]]  # shard key -> (value, the step's figures)
Store = Callable[[str, Any], dict]  # shard key, value -> the store's figures


_SETTINGS = {"max_tokens", "dimension"}  # the same in every shard: not summed


def range_keys(context) -> list[str] | None:
    """The shard keys of a run over several shards, else None (a run of one shard)."""
    if not getattr(context, "has_partition_key_range", False):
        return None
    keys = sorted(context.partition_keys)
    return keys if len(keys) > 1 else None


@dataclass(frozen=True)
class ShardStream:
    """The output of a step over several shards: `produce` runs when the IO manager stores
    the shard, shard after shard."""

    keys: list[str]
    produce: Produce

    def store_each(self, store: Store) -> dict:
        """Produce and store every shard; the metadata of the whole output."""
        by_shard = {}
        for key in self.keys:
            value, figures = self.produce(key)
            by_shard[key] = {**figures, **store(key, value)}
        return range_metadata(by_shard)


class LazyShards(Mapping):
    """An input over several shards, loaded one shard at a time when read."""

    def __init__(self, keys: list[str], load: Callable[[str], Any]):
        self._keys = list(keys)
        self._load = load

    def __getitem__(self, key: str) -> Any:
        if key not in self._keys:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def range_metadata(by_shard: dict[str, dict]) -> dict:
    totals: dict[str, float] = {}
    for figures in by_shard.values():
        for name, value in figures.items():
            if _summable(name, value):
                totals[name] = totals.get(name, 0) + value
    plain = {k: {n: v for n, v in f.items() if _plain(v)} for k, f in by_shard.items()}
    return {
        "shards_in_run": len(by_shard),
        **{f"run_total_{k}": round(v, 3) for k, v in totals.items()},
        "by_shard": dg.MetadataValue.json(plain),
    }


def _summable(name: str, value: Any) -> bool:
    """Counts and durations add up over shards; rates, ratios and settings do not."""
    if isinstance(value, bool) or name in _SETTINGS or name.startswith("dagster/"):
        return False
    return isinstance(value, int) or (isinstance(value, float) and name.endswith("seconds"))


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool | list | dict)
