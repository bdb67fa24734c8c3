"""One run for every shard with work (`<source>_sync_shards`): each shard still gets its own
materializations and check results, and the stored state equals what per-shard runs leave.
Real Postgres + pgvector, Qdrant's embedded engine, an OpenAI-compatible server on 127.0.0.1.
(kill -9 of a many-shards run at every stage: test_crash_every_stage, whose `sync` is one.)"""

import dagster as dg
import sqlalchemy as sa

from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import load_settings
from embedding_assets.definitions import build_definitions
from embedding_assets.defs.shards_job import shards_job_name
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

ROWS = 60
STAGES = ("pending_rows", "chunks", "embeddings", "vector_index")


def source(postgres, tmp_path, fake) -> tuple[str, object]:
    name = unique_name()
    rows = [{"id": i, "title": f"Doc {i}", "body": f"body {i} " * (i % 7)} for i in range(1, 61)]
    create_docs_table(postgres, name, rows)
    path = fake_embedder_settings(
        tmp_path, name, fake.base_url, {}, {"shards": "4", "metadata": "[category]"}
    )
    return name, load_settings(path)


def test_one_run_syncs_every_shard_with_per_shard_events(postgres, home, tmp_path, instance, fake):
    name, settings = source(postgres, tmp_path, fake)
    reports = sync_source(settings, name, None, instance, every_shard=False)
    assert [r.shard for r in reports] == ["00", "01", "02", "03"]
    assert all(r.success for r in reports) and sum(r.rows for r in reports) == ROWS
    runs = instance.get_runs()
    assert [r.job_name for r in runs] == [shards_job_name(name)]  # one run, four shards

    def latest(stage: str, key: str):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey([name, stage]), asset_partitions=[key]),
            limit=1,
        ).records
        return records[0].asset_materialization if records else None

    for key in ("00", "01", "02", "03"):
        for stage in STAGES:
            assert latest(stage, key) is not None, (stage, key)
        rows = latest("pending_rows", key).metadata["rows"].value
        assert rows == next(r.rows for r in reports if r.shard == key)
    checks = instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    )
    evaluated = {
        (r.event_log_entry.dagster_event.event_specific_data.check_name,
         r.event_log_entry.dagster_event.event_specific_data.partition)
        for r in checks
    }  # fmt: skip
    for check in ("vectors_valid", "coverage", "no_dead_rows", "freshness",
                  "self_retrieval", "pgvector_qdrant_parity", "search_recall"):  # fmt: skip
        assert {(check, key) for key in ("00", "01", "02", "03")} <= evaluated, check
    assert sync_source(settings, name, None, instance, every_shard=False) == []


def stored(url: str, table: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    f"SELECT row_id, chunk_index, shard, chunk_text, chunk_hash, model, "
                    f"CAST(embedding AS text), category FROM {table} ORDER BY row_id, chunk_index"
                )
            )
        ]


def ledger(url: str, target: str) -> list[tuple]:
    with engine_for(url).connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(
                sa.text(
                    "SELECT row_id, shard, content_hash, version, chunk_count, deleted, "
                    "qdrant_hash, qdrant_chunk_count FROM embedding_assets.row_state "
                    "WHERE target = :t ORDER BY row_id"
                ),
                {"t": target},
            )
        ]


def test_the_stored_state_equals_what_per_shard_runs_leave(
    postgres, home, tmp_path, instance, fake
):
    many_name, many = source(postgres, tmp_path, fake)
    one_name, one = source(postgres, tmp_path, fake)
    sync_source(many, many_name, None, instance, every_shard=False)
    sync_shards(one, one_name, instance)  # the per-shard asset job, one run per shard
    assert stored(postgres, f"{many_name}_embeddings") == stored(postgres, f"{one_name}_embeddings")
    many_ledger = ledger(postgres, f"public.{many_name}_embeddings")
    assert many_ledger == ledger(postgres, f"public.{one_name}_embeddings")
    assert len(many_ledger) == ROWS
    store = qdrant_store_from_env()
    assert (
        store.count(many_name)
        == store.count(one_name)
        == len(stored(postgres, f"{many_name}_embeddings"))
    )


def test_a_backfill_of_every_shard_is_one_run_that_leaves_the_same_state(
    postgres, home, tmp_path, instance, fake
):
    """What the backfill daemon launches for assets under `BackfillPolicy.single_run()`:
    one run tagged with the shard range. Each step goes shard after shard; each shard gets
    its own materialization (its figures under `by_shard`) and check results."""
    range_name, by_range = source(postgres, tmp_path, fake)
    many_name, many = source(postgres, tmp_path, fake)
    defs = build_definitions(by_range)
    pending_asset = defs.resolve_assets_def(dg.AssetKey([range_name, "pending_rows"]))
    assert pending_asset.backfill_policy == dg.BackfillPolicy.single_run()
    result = defs.resolve_job_def(f"{range_name}_sync").execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": "00",
            "dagster/asset_partition_range_end": "03",
        },
    )
    assert result.success
    sync_source(many, many_name, None, instance, every_shard=False)
    assert stored(postgres, f"{range_name}_embeddings") == stored(
        postgres, f"{many_name}_embeddings"
    )
    assert ledger(postgres, f"public.{range_name}_embeddings") == ledger(
        postgres, f"public.{many_name}_embeddings"
    )
    events = [
        e.event_specific_data.materialization for e in result.get_asset_materialization_events()
    ]
    for stage in STAGES:
        assert {m.partition for m in events if m.asset_key.path[-1] == stage} == {
            "00", "01", "02", "03"
        }, stage  # fmt: skip
    embeddings = next(m for m in events if m.asset_key.path[-1] == "embeddings")
    by_shard = embeddings.metadata["by_shard"].value
    assert sum(figures["rows_written"] for figures in by_shard.values()) == ROWS
    assert embeddings.metadata["run_total_rows_written"].value == ROWS
    evaluations = [
        e.event_specific_data
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ]
    evaluated = {(e.check_name, e.partition, e.passed) for e in evaluations}
    for key in ("00", "01", "02", "03"):
        assert ("vectors_valid", key, True) in evaluated
        assert ("pgvector_qdrant_parity", key, True) in evaluated
    store = qdrant_store_from_env()
    assert store.count(range_name) == len(stored(postgres, f"{range_name}_embeddings"))
    # Nothing left: a second range run finds no rows in any shard.
    again = defs.resolve_job_def(f"{range_name}_sync").execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": "00",
            "dagster/asset_partition_range_end": "03",
        },
    )
    materialized = [
        e.event_specific_data.materialization for e in again.get_asset_materialization_events()
    ]
    pending = [m for m in materialized if m.asset_key.path[-1] == "pending_rows"]
    assert pending and pending[0].metadata["run_total_rows"].value == 0


def test_a_shard_that_fails_while_the_next_is_prepared_leaves_the_others_written(
    postgres, home, tmp_path, instance, fake, monkeypatch
):
    """Shard 01's embedding fails on the helper thread (the failure is injected: a whole
    shard failing is what a provider outage or a bug looks like from here). The run goes on
    with the other shards, fails at the end naming 01, and releases 01's claim, so the next
    run syncs it."""
    from embedding_assets.sync import shard_steps

    name, settings = source(postgres, tmp_path, fake)
    real_embed = shard_steps.embed_pending

    def embed_failing_on_01(runtime, chunks, log, **options):
        if chunks.pending.shard == 1:
            raise RuntimeError("provider fell over")
        return real_embed(runtime, chunks, log, **options)

    monkeypatch.setattr(shard_steps, "embed_pending", embed_failing_on_01)
    reports = {r.shard: r for r in sync_source(settings, name, None, instance, every_shard=False)}
    assert not reports["01"].success and "provider fell over" in reports["01"].error
    assert all(reports[k].success for k in ("00", "02", "03"))
    stored_rows = {row[0] for row in stored(postgres, f"{name}_embeddings")}
    written = sum(reports[k].rows for k in ("00", "02", "03"))
    assert len(stored_rows) == written < ROWS
    monkeypatch.setattr(shard_steps, "embed_pending", real_embed)
    again = sync_source(settings, name, None, instance, every_shard=False)
    assert [r.shard for r in again] == ["01"] and again[0].success  # the claim was released
    assert len({row[0] for row in stored(postgres, f"{name}_embeddings")}) == ROWS


def test_self_retrieval_searches_stop_when_the_runs_budget_is_spent(
    postgres, home, tmp_path, instance, fake, monkeypatch
):
    """With no seconds to spend, every shard's self-retrieval samples nothing and says why;
    the other checks still run."""
    from embedding_assets.sync import shard_checks

    monkeypatch.setattr(shard_checks, "SELF_RETRIEVAL_SECONDS_PER_RUN", 0.0)
    name, settings = source(postgres, tmp_path, fake)
    assert all(r.success for r in sync_source(settings, name, None, instance, every_shard=False))
    records = instance.get_event_records(
        dg.EventRecordsFilter(event_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    )
    evaluations = [r.event_log_entry.dagster_event.event_specific_data for r in records]
    mine = [e for e in evaluations if e.asset_key.path[0] == name]
    retrieval = [e for e in mine if e.check_name == "self_retrieval"]
    assert len(retrieval) == 4
    for evaluation in retrieval:
        assert evaluation.passed and evaluation.metadata["sampled"].value == 0
        assert "spent its 0 s" in evaluation.metadata["skipped"].value
    assert len([e for e in mine if e.check_name == "vectors_valid" and e.passed]) == 4
