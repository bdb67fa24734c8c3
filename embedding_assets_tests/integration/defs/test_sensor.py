"""The sensor asks for exactly the shards with work, once per piece of work."""

import subprocess
import sys

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.core.sharding import shard_of
from embedding_assets.definitions import build_definitions
from embedding_assets.defs.resources import SHARDS_TAG
from embedding_assets.state.db import engine_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    sync_shards,
    unique_name,
    write_settings,
)

pytestmark = pytest.mark.integration


def shards_of(request: dg.RunRequest) -> list[str]:
    """The shards a many-shards run is asked to sync."""
    return request.tags[SHARDS_TAG].split(",")


def evaluate(defs: dg.Definitions, name: str, instance: dg.DagsterInstance):
    sensor = defs.resolve_sensor_def(f"{name}_changes")
    with dg.build_sensor_context(
        instance=instance,
        resources=defs.resources,
        definitions=defs,
    ) as context:
        return sensor.evaluate_tick(context)


def test_sensor_requests_only_shards_with_work_and_never_twice(postgres, home, tmp_path):
    name = unique_name()
    rows = [{"id": i, "title": f"T{i}", "body": "text"} for i in range(1, 21)]
    create_docs_table(postgres, name, rows)
    settings = write_settings(tmp_path, name, name, shards="8")
    defs = build_definitions(settings)
    keys = settings.source(name).shard_keys
    with dg.DagsterInstance.ephemeral() as instance:
        first = evaluate(defs, name, instance)
        expected = sorted({keys[shard_of(str(i), 8)] for i in range(1, 21)})
        # One run covers every shard with work.
        (request,) = first.run_requests
        assert request.job_name == f"{name}_sync_shards" and shards_of(request) == expected

        # Same outstanding work: the same run key, which Dagster never launches twice.
        (again,) = evaluate(defs, name, instance).run_requests
        assert again.run_key == request.run_key

        sync_shards(settings, name, instance)
        idle = evaluate(defs, name, instance)
        assert not idle.run_requests
        assert "nothing pending" in idle.skip_message

        # One changed row: a run of its shard alone, under a new run key.
        with engine_for(postgres).begin() as conn:
            conn.execute(sa.text(f"UPDATE {name} SET body = 'changed' WHERE id = 4"))
        (changed,) = evaluate(defs, name, instance).run_requests
        assert shards_of(changed) == [keys[shard_of("4", 8)]]
        assert changed.run_key != request.run_key

        # The row changes back to an earlier text: still new work, still a new key.
        sync_shards(settings, name, instance, [keys[shard_of("4", 8)]])
        with engine_for(postgres).begin() as conn:
            conn.execute(sa.text(f"UPDATE {name} SET body = 'text' WHERE id = 4"))
        (reverted,) = evaluate(defs, name, instance).run_requests
        assert reverted.run_key not in {request.run_key, changed.run_key}


def test_sensor_skips_a_shard_whose_run_is_in_flight(postgres, home, tmp_path):
    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    settings = write_settings(tmp_path, name, name, shards="2")
    defs = build_definitions(settings)
    key = settings.source(name).shard_keys[shard_of("1", 2)]
    with dg.DagsterInstance.ephemeral() as instance:
        job = defs.resolve_job_def(f"{name}_sync")
        instance.create_run_for_job(
            job_def=job,
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": key},
        )
        result = evaluate(defs, name, instance)
        assert not result.run_requests
        assert key in result.skip_message


def test_failed_work_is_asked_for_again_after_a_growing_wait(postgres, home, tmp_path, monkeypatch):
    from embedding_assets.defs import sensors

    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    settings = write_settings(tmp_path, name, name, shards="1")
    defs = build_definitions(settings)
    job = defs.resolve_job_def(f"{name}_sync_shards")
    with dg.DagsterInstance.ephemeral() as instance:
        first = evaluate(defs, name, instance).run_requests[0]
        # Its run failed (say the embedder was down): same work, so the same fingerprint.
        instance.create_run_for_job(
            job_def=job, status=dg.DagsterRunStatus.FAILURE, tags=first.tags
        )
        held = evaluate(defs, name, instance)
        assert not held.run_requests
        assert "failed 1x, retry in" in held.skip_message
        monkeypatch.setattr(sensors, "RETRY_BASE_SECONDS", 0)
        (retried,) = evaluate(defs, name, instance).run_requests
        assert shards_of(retried) == shards_of(first) and retried.run_key != first.run_key


def test_a_run_whose_process_died_is_failed_its_slots_freed_and_its_work_asked_again(
    postgres, home, tmp_path
):
    from embedding_assets.ops.run_health import WORKER_LOST_TAG, WORKER_TAG, worker_tag

    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    settings = write_settings(tmp_path, name, name, shards="1")
    defs = build_definitions(settings)
    job = defs.resolve_job_def(f"{name}_sync_shards")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with dg.DagsterInstance.ephemeral() as instance:
        first = evaluate(defs, name, instance).run_requests[0]
        run = instance.create_run_for_job(
            job_def=job, status=dg.DagsterRunStatus.STARTED, tags=first.tags
        )
        # The run's worker was a process that is gone now (killed with -9, say).
        host, _, started, run_id = worker_tag(run.run_id)[WORKER_TAG].split("|")
        instance.add_run_tags(run.run_id, {WORKER_TAG: f"{host}|{dead.pid}|{started}|{run_id}"})
        instance.event_log_storage.set_concurrency_slots("qdrant_embedded", 1)
        instance.event_log_storage.claim_concurrency_slot("qdrant_embedded", run.run_id, "step")
        result = evaluate(defs, name, instance)
        record = instance.get_run_record_by_id(run.run_id)
        assert record.dagster_run.status == dg.DagsterRunStatus.FAILURE
        assert record.dagster_run.tags[WORKER_LOST_TAG] == "true"
        assert not instance.event_log_storage.get_concurrency_info("qdrant_embedded").claimed_slots
        # Asked again at once: a dead worker says nothing about the work, so no backoff.
        (again,) = result.run_requests
        assert shards_of(again) == shards_of(first) and again.run_key != first.run_key


def test_a_live_run_is_left_alone(postgres, home, tmp_path):
    from embedding_assets.ops.run_health import worker_tag

    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    settings = write_settings(tmp_path, name, name, shards="1")
    defs = build_definitions(settings)
    with dg.DagsterInstance.ephemeral() as instance:
        run = instance.create_run_for_job(
            job_def=defs.resolve_job_def(f"{name}_sync"),
            status=dg.DagsterRunStatus.STARTED,
            tags={"dagster/partition": "00"},
        )
        instance.add_run_tags(run.run_id, worker_tag(run.run_id))  # this process: alive
        result = evaluate(defs, name, instance)
        assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED
        assert not result.run_requests and "run in flight" in result.skip_message


def test_a_run_from_the_ui_holds_its_shard_for_the_sensor_too(postgres, home, tmp_path):
    """A UI materialization runs the implicit asset job, not the source's sync job: the
    sensor must still see the shard as busy."""
    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    settings = write_settings(tmp_path, name, name, shards="1")
    defs = build_definitions(settings)
    keys = [dg.AssetKey([name, stage]) for stage in ("pending_rows", "chunks", "embeddings")]
    with dg.DagsterInstance.ephemeral() as instance:
        instance.create_run_for_job(
            job_def=defs.resolve_implicit_global_asset_job_def(),
            status=dg.DagsterRunStatus.STARTED,
            asset_selection=frozenset(keys),
            tags={"dagster/partition": "00"},
        )
        result = evaluate(defs, name, instance)
        assert not result.run_requests and "00 (run in flight)" in result.skip_message


def test_a_ui_run_and_a_sensor_run_of_one_shard_at_once_write_it_once(
    postgres, home, tmp_path, monkeypatch
):
    """Two processes materialize the same shard at the same time: the sync job from the
    CLI (what the sensor launches) and the implicit asset job the UI runs. The shard claim
    makes the second wait; it then finds the work done and embeds nothing again."""
    import json
    import time

    from embedding_assets_tests.integration.helpers import dagster_database

    name = unique_name()
    rows = 2000  # seconds of embedding: long enough for the two runs to overlap
    create_docs_table(
        postgres, name, [{"id": i, "title": f"t{i}", "body": "b"} for i in range(rows)]
    )
    settings = write_settings(tmp_path, name, name, shards="1")
    defs = build_definitions(settings)
    from embedding_assets.sync.generations import runtime_for

    runtime_for(settings, name, postgres).embedder.embed_documents(["warm"])  # load it now
    dagster_url = dagster_database(postgres)
    monkeypatch.setenv("EMBEDDING_ASSETS_DAGSTER_PG_URL", dagster_url)
    child = subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "--sources", str(settings.path)]
        + ["sync", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Start the UI's run once the CLI's run holds the shard's claim, so the two overlap.
    claim = sa.text(
        """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
        AND objsubid = 2 AND objid = 0
        AND classid::bigint = (hashtext(:k)::bigint & 4294967295)"""
    )
    deadline = time.monotonic() + 120
    with engine_for(postgres).connect() as conn:
        while time.monotonic() < deadline and child.poll() is None:
            if conn.scalar(claim, {"k": f"public.{name}_embeddings#claim"}):
                break
            conn.rollback()
            time.sleep(0.05)
    stages = ("pending_rows", "chunks", "embeddings", "vector_index")
    with dg.DagsterInstance.ephemeral() as instance:
        ui = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            partition_key="00",
            instance=instance,
            asset_selection=[dg.AssetKey([name, stage]) for stage in stages],
        )
        waited = [
            entry.user_message
            for entry in instance.all_logs(ui.run_id)
            if "being synced by another run" in (entry.user_message or "")
        ]
    out, err = child.communicate(timeout=300)
    assert ui.success and child.returncode == 0, err[-3000:]
    embedded = sum(
        event.event_specific_data.materialization.metadata["embedded_chunks"].value
        for event in ui.get_asset_materialization_events()
        if event.event_specific_data.materialization.asset_key.path[-1] == "embeddings"
    )
    cli_embedded = sum(r["embedded_chunks"] for r in json.loads(out.strip().splitlines()[-1]))
    assert embedded + cli_embedded == rows  # each row embedded by exactly one of them
    # They did overlap: one of them waited for the other's claim on the shard.
    assert waited or "being synced by another run" in err
    with engine_for(postgres).connect() as conn:
        stored, chunks = conn.execute(
            sa.text(f"SELECT count(DISTINCT row_id), count(*) FROM {name}_embeddings")
        ).one()
    assert stored == chunks == rows
    from embedding_assets.ops.environment import qdrant_store_from_env

    assert qdrant_store_from_env().count(name) == rows


def test_the_lag_sensor_shows_waiting_rows_without_any_sync_run(postgres, home, tmp_path):
    """With the changes sensor off, rows that wait are recorded per shard, and a shard
    whose oldest change waited past `freshness_seconds` gets a run of its `freshness`
    check alone, which fails; once synced, the check passes again."""
    import time

    name = unique_name()
    create_docs_table(postgres, name, [{"id": i, "title": f"t{i}", "body": "b"} for i in range(8)])
    settings = write_settings(tmp_path, name, name, shards="2", freshness_seconds="1")
    defs = build_definitions(settings)
    lag_sensor = defs.resolve_sensor_def(f"{name}_lag")
    with dg.DagsterInstance.ephemeral() as instance:
        sync_shards(settings, name, instance)

        def tick(cursor=None):
            with dg.build_sensor_context(
                instance=instance, resources=defs.resources, definitions=defs, cursor=cursor
            ) as context:
                return lag_sensor.evaluate_tick(context)

        current = tick()
        assert "every shard is current" in current.skip_message
        with engine_for(postgres).begin() as conn:
            conn.execute(sa.text(f"UPDATE {name} SET body = 'new' WHERE id IN (1, 2, 3)"))
        time.sleep(1.5)
        behind = tick(current.cursor)
        shards = {settings.source(name).shard_keys[shard_of(str(i), 2)] for i in (1, 2, 3)}
        (request,) = behind.run_requests
        assert set(request.tags["embedding_assets/shards"].split(",")) == shards
        observed = {
            e.partition: e.metadata["pending_rows"].value
            for e in behind.asset_events
            if isinstance(e, dg.AssetObservation) and e.partition
        }
        assert sum(observed.values()) == 3
        # The check's run, as the daemon would launch it, marks those shards late.
        result = defs.resolve_job_def(f"{name}_freshness").execute_in_process(
            instance=instance, tags=request.tags
        )
        evaluations = result.get_asset_check_evaluations()
        assert {e.partition for e in evaluations if not e.passed} == shards
        assert all(e.check_name == "freshness" for e in evaluations)
        shard = sorted(shards)[0]
        # Nothing changed since: no new events or runs until the figures move.
        quiet = tick(behind.cursor)
        assert not quiet.asset_events and not quiet.run_requests and "late" in quiet.skip_message
        # A sync clears it: the run's own freshness check passes.
        synced = sync_shards(settings, name, instance, shards=[shard])
        checks = synced[shard].get_asset_check_evaluations()
        assert {c.check_name: c.passed for c in checks}["freshness"] is True


def test_failed_work_goes_again_as_soon_as_the_embedder_answers_after_an_outage(
    postgres, home, tmp_path, monkeypatch
):
    """Runs failed while the embedder was down: the sensor probes it (one small request)
    while the work waits out its 60 s backoff, and asks again as soon as it answers."""
    from embedding_assets.config.settings import load_settings
    from embedding_assets.sync import outage
    from embedding_assets_tests.fakes.provider_server import ProviderServer
    from embedding_assets_tests.integration.helpers import fake_embedder_settings

    monkeypatch.setattr(outage, "PROBE_EVERY_SECONDS", 0.0)
    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    with ProviderServer("openai", dim=8) as fake, dg.DagsterInstance.ephemeral() as instance:
        path = fake_embedder_settings(tmp_path, name, fake.base_url, {}, {"shards": "1"})
        defs = build_definitions(load_settings(path))
        sensor = defs.resolve_sensor_def(f"{name}_changes")

        def tick(cursor):
            with dg.build_sensor_context(
                instance=instance, resources=defs.resources, definitions=defs, cursor=cursor
            ) as context:
                result = sensor.evaluate_tick(context)
                return result, context.cursor

        first, cursor = tick(None)
        job = defs.resolve_job_def(f"{name}_sync_shards")
        instance.create_run_for_job(
            job_def=job, status=dg.DagsterRunStatus.FAILURE, tags=first.run_requests[0].tags
        )
        fake.unknown_model = True  # the embedder refuses every request: down
        held, cursor = tick(cursor)
        assert not held.run_requests and "retry in" in held.skip_message
        held, cursor = tick(cursor)  # probed: down
        assert not held.run_requests
        requests_while_down = len(fake.requests)
        fake.unknown_model = False  # back
        result, cursor = tick(cursor)
        (retried,) = result.run_requests
        assert retried.run_key != first.run_requests[0].run_key
        assert len(fake.requests) == requests_while_down + 1  # one probe, then the run


def test_sensor_leaves_fresh_changes_to_a_live_lane_that_is_up_and_takes_them_when_it_is_not(
    postgres, home, tmp_path
):
    from embedding_assets.state.lanes import STALE_SECONDS, LaneRegistry
    from embedding_assets.sync.live_pass import LANE_GRACE_SECONDS

    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "one", "body": "text"}])
    settings = write_settings(tmp_path, name, name, shards="2")
    defs = build_definitions(settings)
    engine = engine_for(postgres)
    with dg.DagsterInstance.ephemeral() as instance:
        sync_shards(settings, name, instance)
        lane = LaneRegistry(engine, f"test:{name}", [name])
        lane.register()
        with engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE {name} SET body = 'changed' WHERE id = 1"))
        up = evaluate(defs, name, instance)
        assert not up.run_requests and "left to the live lane" in up.skip_message
        # The lane is killed: its heartbeat goes stale, the sensor's runs take the change.
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE embedding_assets.live_lanes SET heartbeat_at = now() "
                    "- make_interval(secs => :s) WHERE lane = :l"
                ),
                {"s": STALE_SECONDS + 1, "l": f"test:{name}"},
            )
        (down,) = evaluate(defs, name, instance).run_requests
        assert shards_of(down) == [settings.source(name).shard_keys[shard_of("1", 2)]]
        # Up again, but the change has waited past the grace: a lane that cannot write it
        # (a bad row, its embedder) does not strand it.
        lane.beat(0)
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE embedding_assets.change_queue SET queued_at = now() "
                    "- make_interval(secs => :s) WHERE target LIKE :t"
                ),
                {"s": LANE_GRACE_SECONDS + 1, "t": f"%{name}%"},
            )
        assert evaluate(defs, name, instance).run_requests
        lane.leave()
