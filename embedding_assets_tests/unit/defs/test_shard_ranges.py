"""A step over several shards: each shard produced and stored in turn, one at a time, and
metadata that keeps each shard's figures apart from the run's totals."""

import pytest

from embedding_assets.defs.shard_ranges import LazyShards, ShardStream, range_metadata


def test_each_shard_is_produced_then_stored_before_the_next():
    order: list[str] = []

    def produce(key: str):
        order.append(f"produce {key}")
        return key * 2, {"rows": int(key), "rows_per_second": 10.0, "duration_seconds": 0.5}

    def store(key: str, value):
        order.append(f"store {key}={value}")
        return {"rows_written": int(key)}

    metadata = ShardStream(["1", "2"], produce).store_each(store)
    assert order == ["produce 1", "store 1=11", "produce 2", "store 2=22"]
    assert metadata["shards_in_run"] == 2
    assert metadata["run_total_rows"] == 3
    assert metadata["run_total_rows_written"] == 3
    assert metadata["run_total_duration_seconds"] == 1.0
    assert "run_total_rows_per_second" not in metadata  # rates do not add up
    assert metadata["by_shard"].value["2"] == {
        "rows": 2,
        "rows_per_second": 10.0,
        "duration_seconds": 0.5,
        "rows_written": 2,
    }


def test_settings_and_row_counts_are_not_summed():
    metadata = range_metadata({"0": {"max_tokens": 256, "dagster/row_count": 5, "ok": True}})
    assert set(metadata) == {"shards_in_run", "by_shard"}


def test_lazy_shards_load_a_shard_only_when_read():
    loaded: list[str] = []
    shards = LazyShards(["00", "01"], lambda key: loaded.append(key) or key)
    assert list(shards) == ["00", "01"] and len(shards) == 2 and loaded == []
    assert shards["01"] == "01" and loaded == ["01"]
    with pytest.raises(KeyError):
        shards["02"]
