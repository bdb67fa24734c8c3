"""Metadata columns of array and json types reach pgvector as the same values and Qdrant
as JSON: an array written as JSON text, or a jsonb scalar written raw, used to make COPY
fail and block every clean row of the shard."""

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.runtime import qdrant_store_from_env, runtime_for
from embedding_assets.settings import load_settings
from embedding_assets.state.db import engine_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration

VALUES = {
    1: ('{a,"b c",NULL}', "{1,2,3}", '{"k": [1, "x"]}'),
    2: ("{}", "{}", '"just a string"'),
    3: ('{"with,comma","quote\\"d"}', "{-5}", "true"),
    4: (None, None, "[1, 2.5, null]"),
    5: ("{x}", "{7}", "42"),
}


def test_array_and_jsonb_metadata_round_trip(postgres, home, tmp_path):
    name = unique_name()
    with engine_for(postgres).begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {name} (id int PRIMARY KEY, title text, body text, "
                "tags text[], counts int[], extra jsonb)"
            )
        )
        for i, (tags, counts, extra) in VALUES.items():
            conn.execute(
                sa.text(
                    f"INSERT INTO {name} VALUES (:i, :t, 'body', CAST(:tags AS text[]), "
                    "CAST(:counts AS int[]), CAST(:extra AS jsonb))"
                ),
                {"i": i, "t": f"Doc {i}", "tags": tags, "counts": counts, "extra": extra},
            )
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(
            tmp_path,
            name,
            server.base_url,
            {},
            {"shards": "1", "metadata": "[tags, counts, extra]"},
        )
        settings = load_settings(path)
        with dg.DagsterInstance.ephemeral() as instance:
            assert sync_shards(settings, name, instance)["00"].success
    runtime = runtime_for(settings, name, postgres)
    with engine_for(postgres).connect() as conn:
        source = {
            str(r.id): (r.tags, r.counts, r.extra)
            for r in conn.execute(sa.text(f"SELECT id, tags, counts, extra FROM {name}"))
        }
        stored = {
            r.row_id: (r.tags, r.counts, r.extra)
            for r in conn.execute(
                sa.text(f"SELECT row_id, tags, counts, extra FROM {runtime.pgvector.table}")
            )
        }
    assert stored == source and len(stored) == len(VALUES)
    assert stored["2"] == ([], [], "just a string") and stored["3"][2] is True
    points = qdrant_store_from_env().retrieve(
        runtime.qdrant.collection, runtime.pgvector.stored_chunks(0)["point_id"].tolist()
    )
    payloads = {p.payload["row_id"]: p.payload for p in points}
    assert payloads["1"]["tags"] == ["a", "b c", None] and payloads["1"]["counts"] == [1, 2, 3]
    assert payloads["1"]["extra"] == {"k": [1, "x"]} and payloads["4"]["extra"] == [1, 2.5, None]
    assert payloads["5"]["extra"] == 42 and payloads["4"]["tags"] is None
