"""A very large row is embedded in bounded pieces whose vectors are kept as they finish: a
real `embedding-assets sync` killed (-9) in the middle of the row's embedding step loses
at most one piece, and the next sync embeds only what was left. The embedder is an
OpenAI-compatible fake on 127.0.0.1, rate-limited so the step lasts long enough to kill."""

import time

import pytest
import sqlalchemy as sa

from embedding_assets.config.settings import load_settings
from embedding_assets.state.db import engine_for
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.sync.embed import PROGRESS_CHUNKS
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import fake_embedder_settings, unique_name
from embedding_assets_tests.integration.sync.test_crash_every_stage import (  # noqa: F401
    dagster_url,
    kill,
    run_sync,
    wait_for,
)

pytestmark = pytest.mark.integration

WORDS = 40_000
PER_REQUEST = 16


def cached(url: str, target: str) -> int:
    with engine_for(url).connect() as conn:
        return int(
            conn.scalar(
                sa.text(f"SELECT count(*) FROM {STATE_SCHEMA}.vector_cache WHERE target = :t"),
                {"t": target},
            )
        )


def test_a_killed_run_keeps_the_pieces_of_a_large_row_it_finished(
    postgres,
    home,
    tmp_path,
    dagster_url,  # noqa: F811
):
    name = unique_name()
    body = " ".join(f"token{i % 997}x{i // 997}" for i in range(WORDS))
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {name} (id int PRIMARY KEY, title text, body text)"))
        conn.execute(
            sa.text(f"INSERT INTO {name} VALUES (1, 'big', :b), (2, 'small', 'x')"), {"b": body}
        )
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(
            tmp_path,
            name,
            server.base_url,
            {"max_inputs_per_request": str(PER_REQUEST), "requests_per_second": "40"},
            {"shards": "1", "chunking": "{max_tokens: 16, overlap: 0}"},
        )
        runtime = runtime_for(load_settings(path), name, postgres)
        process = run_sync(path, name, dagster_url)
        wait_for(
            lambda: cached(postgres, runtime.target) >= 2 * PROGRESS_CHUNKS,
            process,
            "two pieces of the large row in the vector cache",
        )
        kill(process)
        kept = cached(postgres, runtime.target)
        assert not runtime.pgvector.table_exists() or runtime.pgvector.chunk_count(0) == 0
        sent_before = sum(len(r.inputs) for r in server.requests)

        started = time.monotonic()
        process = run_sync(path, name, dagster_url)
        assert process.wait(timeout=300) == 0
        seconds = time.monotonic() - started
        sent_after = sum(len(r.inputs) for r in server.requests) - sent_before

    chunks = runtime.pgvector.chunk_count(0)
    assert chunks > 3 * PROGRESS_CHUNKS
    # The second run embedded only what the first had not kept (the row's distinct chunks
    # minus the cache), plus the small row; the cache is emptied by the store.
    assert sent_after <= chunks - kept + 1, (sent_after, chunks, kept, seconds)
    assert cached(postgres, runtime.target) == 0
    with engine_for(postgres).connect() as conn:
        texts = conn.execute(
            sa.text(
                f"SELECT chunk_text FROM {runtime.pgvector.table} WHERE row_id = '1' "
                "ORDER BY chunk_index"
            )
        ).scalars()
        # Every piece stored, in order (chunks are slices; a boundary may cut a word).
        assert "".join(texts).replace(" ", "") == f"big: {body}".replace(" ", "")
