"""A source synced through a remote provider (a fake Cohere on 127.0.0.1) by the real job:
faults survived, a rejected row isolated, the API key nowhere in output or stored events."""

import textwrap

import dagster as dg
import pytest
from dagster._serdes import serialize_value

from embedding_assets.config.settings import load_settings
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import Fault, ProviderServer
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    materialization_metadata,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration

KEY = "sk-test-9f8e7d6c5b4a-DO-NOT-LEAK"
KEY_ENV = "TEST_COHERE_KEY"


def cohere_settings(tmp_path, name: str, url: str):
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            embedders:
              cohere:
                provider: cohere
                model: embed-english-v3.0
                base_urls: ["{url}"]
                api_key_env: {KEY_ENV}
                dimension: 8
                max_inputs_per_request: 4
                timeout_seconds: 5
            sources:
              - name: {name}
                table: {name}
                text: "{{title}}: {{body}}"
                embedder: cohere
                shards: 1
            """
        )
    )
    return load_settings(path)


def stored_events_text(instance: dg.DagsterInstance) -> str:
    """Every event the instance stored, serialized as Dagster stores it."""
    return "\n".join(
        serialize_value(entry)
        for run in instance.get_runs()
        for entry in instance.all_logs(run.run_id)
    )


def test_remote_provider_faults_rejected_row_and_no_key_leak(
    postgres, home, tmp_path, monkeypatch, capfd
):
    monkeypatch.setenv(KEY_ENV, KEY)
    name = unique_name()
    rows = [{"id": i, "title": f"Doc {i}", "body": f"about topic {i}"} for i in range(1, 21)]
    create_docs_table(postgres, name, rows)
    with ProviderServer("cohere", dim=8, api_key=KEY) as server:
        server.script(Fault.http(429, "slow down", retry_after="1"), Fault.http(503, "busy"))
        server.reject_text = "Doc 13: about topic 13"
        settings = cohere_settings(tmp_path, name, server.base_url)
        with dg.DagsterInstance.ephemeral() as instance:
            result = sync_shards(settings, name, instance)["00"]
            assert result.success
            meta = materialization_metadata(result, "embeddings")
            assert meta["failed_rows"] == 1
            assert list(meta["failed_row_reasons"]) == ["13"]
            assert meta["embedder_retries"] >= 2
            assert meta["embedded_chunks"] == 19  # the rejected chunk is not counted
            runtime = runtime_for(settings, name, postgres)
            work = runtime.exact_work()[0]
            # The rejected row waits in the error table for its retry: not pending now.
            assert (work.embedded_rows, work.pending_rows) == (19, 0)
            (error,) = runtime.errors.list()
            assert (error.row_id, error.kind, error.attempts) == ("13", "rejected", 1)
            # Stored documents were embedded as documents, never as queries.
            assert {r.input_type for r in server.requests if r.inputs} == {
                "document"
            }  # the fake records the normalised type

            # A wrong key: the run fails, the error names the variable, never the key.
            monkeypatch.setenv(KEY_ENV, "sk-wrong")
            server.reject_text = None
            runtime.errors.replay(["13"])  # work to do: the rejected row, pending again
            from embedding_assets.embedders.build import build_embedder

            build_embedder.cache_clear()
            failed = sync_shards(settings, name, instance, raise_on_error=False)["00"]
            assert not failed.success
            messages = " ".join(
                str(e.event_specific_data) for e in failed.all_events if e.is_failure
            )
            assert KEY_ENV in messages
            events = stored_events_text(instance)
    out, err = capfd.readouterr()
    for text in (out, err, events):
        assert KEY not in text
