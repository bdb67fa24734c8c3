"""Every key of sources.yaml has a declared effect on a store already built."""

import typing

import pytest

from embedding_assets.config.effects import (
    EMBEDDER_KEYS,
    SOURCE_KEYS,
    Effect,
    changed_keys,
    fingerprint,
    model_keys,
    recorded_config,
)
from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec

EMBEDDER_MODELS = typing.get_args(typing.get_args(EmbedderSpec)[0])


def test_every_source_key_has_an_effect():
    keys = model_keys(SourceSpec)
    assert "where" in keys and "pgvector.hnsw.m" in keys and "write_back.column" in keys
    missing = sorted(set(keys) - set(SOURCE_KEYS))
    assert not missing, f"give these sources.yaml keys an effect in config/effects.py: {missing}"
    assert not set(SOURCE_KEYS) - set(keys), "the table names keys that do not exist"


@pytest.mark.parametrize("model", EMBEDDER_MODELS, ids=lambda m: m.__name__)
def test_every_embedder_key_has_an_effect(model):
    missing = sorted(set(model_keys(model)) - set(EMBEDDER_KEYS))
    assert not missing, f"give these embedder keys an effect in config/effects.py: {missing}"


def test_every_key_the_table_names_exists_in_some_embedder():
    known = {key for model in EMBEDDER_MODELS for key in model_keys(model)}
    assert set(EMBEDDER_KEYS) == known


def spec(**changes) -> SourceSpec:
    return SourceSpec(name="docs", table="docs", text="{title}", **changes)


def test_changed_keys_name_each_edit_with_its_effect():
    before = recorded_config(spec(where="kind = 'even'", metadata=["kind"]))
    after = recorded_config(spec(where="kind = 'odd'", metadata=["kind", "lang"]))
    assert changed_keys(before, after) == {"where": Effect.ELIGIBILITY, "metadata": Effect.IN_PLACE}
    assert changed_keys(after, after) == {}


def test_operational_and_reembed_keys_are_not_recorded():
    base = recorded_config(spec())
    assert recorded_config(spec(max_rows_per_run=5, sensor_interval_seconds=9)) == base
    assert recorded_config(spec(chunking={"max_tokens": 64, "overlap": 8})) == base
    assert "text" not in base and "shards" not in base


def test_fingerprints_are_per_effect():
    base = recorded_config(spec())
    moved = recorded_config(spec(where="true"))
    assert fingerprint(base, Effect.ELIGIBILITY) != fingerprint(moved, Effect.ELIGIBILITY)
    assert fingerprint(base, Effect.IN_PLACE) == fingerprint(moved, Effect.IN_PLACE)


def test_write_back_added_is_an_in_place_edit():
    before = recorded_config(spec())
    after = recorded_config(spec(write_back={"column": "embedding"}))
    changed = changed_keys(before, after)
    assert "write_back.column" in changed and all(k.startswith("write_back.") for k in changed)
    assert set(changed.values()) == {Effect.IN_PLACE}
