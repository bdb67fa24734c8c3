"""The per-row error table, through the real job and sensor, with an OpenAI-compatible fake
on 127.0.0.1 as the embedder: failed rows are recorded with the batch, retried after a
growing wait, dead after `max_attempts`, replayable, and never starve their shard; an
outage fails the run without charging any row an attempt."""

import time

import dagster as dg
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from embedding_assets.cli.main import main
from embedding_assets.config.settings import load_settings
from embedding_assets.definitions import build_definitions
from embedding_assets.state.db import engine_for
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import Fault, ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    materialization_metadata,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration


def remote_settings(tmp_path, name: str, url: str, capture: str = "auto", **source: str):
    path = fake_embedder_settings(
        tmp_path,
        name,
        url,
        {"max_inputs_per_request": "16", "timeout_seconds": "5", "max_attempts": "2"},
        {
            "change_capture": capture,
            "shards": "1",
            "retries": "{max_attempts: 3, first_wait_seconds: 0, max_wait_seconds: 0}",
            **source,
        },
    )
    return load_settings(path), path


def stored_ids(url: str, runtime) -> set[str]:
    with engine_for(url).connect() as conn:
        return set(conn.scalars(sa.text(f"SELECT DISTINCT row_id FROM {runtime.pgvector.table}")))


def evaluate(defs: dg.Definitions, name: str, instance, cursor: str | None = None):
    sensor = defs.resolve_sensor_def(f"{name}_changes")
    with dg.build_sensor_context(
        instance=instance, resources=defs.resources, definitions=defs, cursor=cursor
    ) as context:
        return sensor.evaluate_tick(context)


def cli(settings_path, *args: str):
    return CliRunner().invoke(main, ["--sources", str(settings_path), *args])


def test_a_rejected_row_is_recorded_retried_dead_and_replayable(postgres, home, tmp_path):
    name = unique_name()
    rows = [{"id": i, "title": f"Doc {i}", "body": "words"} for i in range(1, 11)]
    create_docs_table(postgres, name, rows)
    with ProviderServer("openai", dim=8) as server:
        server.reject_text = "Doc 7: words"
        settings, path = remote_settings(tmp_path, name, server.base_url)
        runtime = runtime_for(settings, name, postgres)
        with dg.DagsterInstance.ephemeral() as instance:
            result = sync_shards(settings, name, instance)["00"]
            assert materialization_metadata(result, "embeddings")["failed_rows"] == 1
            assert stored_ids(postgres, runtime) == {str(i) for i in range(1, 11)} - {"7"}
            (error,) = runtime.errors.list()
            assert (error.row_id, error.kind, error.attempts, error.state) == (
                "7",
                "rejected",
                1,
                "retrying",
            )
            assert "rejected by the content filter" in error.message
            # The retry time has come (first_wait_seconds: 0): each sync tries it again.
            for attempt in (2, 3):
                sync_shards(settings, name, instance)
                (error,) = runtime.errors.list()
                assert error.attempts == attempt
            assert (error.state, error.next_retry_at) == ("dead", None)
            # Dead: no more work, and the sensor asks for nothing.
            assert not runtime.work()[0].has_work
            defs = build_definitions(settings)
            assert not evaluate(defs, name, instance).run_requests

            listed = cli(path, "errors", "--source", name, "--json")
            assert listed.exit_code == 0, listed.output
            assert '"row_id": "7"' in listed.output and '"state": "dead"' in listed.output
            report = cli(path, "status", "--source", name, "--json")
            assert '"dead_rows": 1' in report.output, report.output

            # Replayed after the provider stopped rejecting it: embedded, error cleared.
            server.reject_text = None
            replay = cli(path, "errors", "replay", "--source", name, "--all-dead")
            assert replay.exit_code == 0 and "1 rows pending again" in replay.output
            assert evaluate(defs, name, instance).run_requests
            sync_shards(settings, name, instance)
            assert "7" in stored_ids(postgres, runtime)
            assert runtime.errors.list() == []


def test_a_dead_row_is_tried_again_when_its_content_changes(postgres, home, tmp_path):
    name = unique_name()
    create_docs_table(postgres, name, [{"id": 1, "title": "Doc 1", "body": "bad"}])
    with ProviderServer("openai", dim=8) as server:
        server.reject_containing = "bad"
        settings, _ = remote_settings(tmp_path, name, server.base_url, retries="{max_attempts: 1}")
        runtime = runtime_for(settings, name, postgres)
        with dg.DagsterInstance.ephemeral() as instance:
            sync_shards(settings, name, instance)
            assert runtime.errors.list()[0].state == "dead"
            with engine_for(postgres).begin() as conn:
                conn.execute(sa.text(f"UPDATE {name} SET body = 'fixed' WHERE id = 1"))
            sync_shards(settings, name, instance)
            assert stored_ids(postgres, runtime) == {"1"}
            assert runtime.errors.list() == []


@pytest.mark.parametrize("capture", ["trigger", "watermark", "diff"])
def test_failing_rows_beyond_max_rows_per_run_never_starve_the_shard(
    postgres, home, tmp_path, capture
):
    name = unique_name()
    # Failing rows first in id order: `ORDER BY row_id LIMIT` used to hide the rest forever.
    bad = [{"id": i, "title": f"Bad {i}", "body": "poison"} for i in range(10, 25)]
    good = [{"id": i, "title": f"Good {i}", "body": "fine"} for i in range(50, 60)]
    create_docs_table(postgres, name, bad + good)
    with ProviderServer("openai", dim=8) as server:
        server.reject_containing = "poison"
        settings, _ = remote_settings(
            tmp_path,
            name,
            server.base_url,
            capture,
            **({"watermark_column": "id"} if capture == "watermark" else {}),
            max_rows_per_run="5",
            retries="{max_attempts: 2, first_wait_seconds: 3600}",
        )
        runtime = runtime_for(settings, name, postgres)
        with dg.DagsterInstance.ephemeral() as instance:
            for _ in range(8):  # as `sync` or the sensor would: again while work remains
                sync_shards(settings, name, instance)
                if not runtime.work()[0].has_work:
                    break
        assert stored_ids(postgres, runtime) == {str(r["id"]) for r in good}
        errors = runtime.errors.list()
        assert len(errors) == 15 and {e.state for e in errors} == {"retrying"}
        assert not runtime.work()[0].has_work  # waiting an hour: nothing to do now


def test_the_sensor_asks_again_when_a_retry_is_due_with_no_change_to_the_data(
    postgres, home, tmp_path
):
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"Doc {i}", "body": "words"} for i in range(1, 5)]
    )
    with ProviderServer("openai", dim=8) as server:
        server.reject_text = "Doc 2: words"
        settings, _ = remote_settings(
            tmp_path, name, server.base_url, retries="{max_attempts: 5, first_wait_seconds: 2}"
        )
        defs = build_definitions(settings)
        with dg.DagsterInstance.ephemeral() as instance:
            first = evaluate(defs, name, instance).run_requests
            sync_shards(settings, name, instance)
            waiting = evaluate(defs, name, instance)
            assert not waiting.run_requests  # backing off: nothing is asked for
            time.sleep(2.5)
            server.reject_text = None  # the provider recovered; the table did not change
            due = evaluate(defs, name, instance).run_requests
            assert len(due) == 1 and due[0].run_key not in {r.run_key for r in first}
            sync_shards(settings, name, instance)
        runtime = runtime_for(settings, name, postgres)
        assert stored_ids(postgres, runtime) == {"1", "2", "3", "4"}
        assert runtime.errors.list() == []


def test_an_outage_fails_the_run_and_charges_no_row(postgres, home, tmp_path):
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"Doc {i}", "body": "words"} for i in range(1, 21)]
    )
    with ProviderServer("openai", dim=8) as server:
        settings, path = remote_settings(tmp_path, name, server.base_url)
        runtime = runtime_for(settings, name, postgres)
        server.script(*[Fault.http(503, "down for maintenance")] * 50)
        with dg.DagsterInstance.ephemeral() as instance:
            failed = sync_shards(settings, name, instance, raise_on_error=False)["00"]
            assert not failed.success
            assert runtime.errors.list() == []  # nobody's fault: no attempt counted
            assert runtime.work()[0].pending_rows == 20
        with server._lock:  # the outage ends
            server._faults.clear()
        result = cli(path, "sync", "--source", name)
        assert result.exit_code == 0, result.output
        assert stored_ids(postgres, runtime) == {str(i) for i in range(1, 21)}


def test_sync_reports_failed_rows_and_exits_non_zero(postgres, home, tmp_path):
    name = unique_name()
    create_docs_table(
        postgres, name, [{"id": i, "title": f"Doc {i}", "body": "words"} for i in range(1, 6)]
    )
    with ProviderServer("openai", dim=8) as server:
        server.reject_text = "Doc 3: words"
        settings, path = remote_settings(tmp_path, name, server.base_url)
        result = cli(path, "sync", "--source", name)
        assert result.exit_code == 1
        assert "1 rows FAILED" in result.output
        assert "1 rows failed to embed" in result.output and "embedding-assets errors" in (
            result.output
        )
        listed = cli(path, "errors", "--source", name)
        assert "3" in listed.output and "rejected" in listed.output
