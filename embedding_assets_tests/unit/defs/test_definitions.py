"""The code location loads: every source's assets, checks, jobs, sensor and schedule."""

import dagster as dg

from embedding_assets.config.settings import load_settings
from embedding_assets.definitions import build_definitions


def test_bundled_definitions_load_with_every_job_sensor_and_schedule():
    defs = build_definitions(load_settings())
    dg.Definitions.validate_loadable(defs)
    repository = defs.get_repository_def()
    assert {"pypi_packages_sync", "pypi_packages_reconcile"} <= set(repository.job_names)
    assert repository.has_sensor_def("pypi_packages_changes")
    schedule = repository.get_schedule_def("pypi_packages_reconcile_schedule")
    assert schedule.cron_schedule == "0 3 * * *"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    sensor = repository.get_sensor_def("pypi_packages_changes")
    assert sensor.minimum_interval_seconds == 2
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING


def test_reconcile_schedule_off_with_a_null_cron_and_the_sensor_stopped_by_setting(tmp_path):
    path = tmp_path / "sources.yaml"
    path.write_text(
        "embedders: {local: {provider: sentence_transformers}}\n"
        "sources: [{name: docs, table: docs, text: '{body}', reconcile: {cron: null},"
        " sensor_status: stopped}]\n"
    )
    repository = build_definitions(load_settings(path)).get_repository_def()
    assert "docs_reconcile" in repository.job_names
    assert not repository.schedule_defs
    changes = repository.get_sensor_def("docs_changes")
    assert changes.default_status == dg.DefaultSensorStatus.STOPPED
    # The lag sensor stays on: it is what shows the waiting rows.
    assert repository.get_sensor_def("docs_lag").default_status == dg.DefaultSensorStatus.RUNNING


def test_the_graph_reads_like_a_dagster_integration(tmp_path):
    """Source table upstream, staging marked, sinks named with Dagster's standard keys,
    kinds from the embedder configured, owners and tags from sources.yaml, one executor."""
    path = tmp_path / "sources.yaml"
    path.write_text(
        "embedders:\n"
        "  remote: {provider: openai, model: m, base_urls: ['http://127.0.0.1:9/v1'],"
        " dimension: 8}\n"
        "sources:\n"
        "  - {name: docs, table: app.docs, text: '{body}', metadata: [lang], embedder: remote,\n"
        "     owners: [team:search], tags: {domain: support}, description: Help articles}\n"
    )
    defs = build_definitions(load_settings(path))
    graph = defs.resolve_asset_graph()
    source = dg.AssetKey(["docs", "source"])
    assert graph.get(dg.AssetKey(["docs", "pending_rows"])).parent_keys == {source}
    specs = {spec.key: spec for spec in defs.resolve_all_asset_specs()}
    assert specs[source].metadata["dagster/table_name"] == "app.docs"
    assert specs[source].description.startswith("Help articles")
    embeddings = specs[dg.AssetKey(["docs", "embeddings"])]
    assert embeddings.kinds == {"pgvector", "openai"}  # not "pytorch" for an HTTP service
    assert embeddings.metadata["dagster/table_name"] == "app.docs_embeddings"
    columns = {c.name: c.type for c in embeddings.metadata["dagster/column_schema"].columns}
    assert columns["embedding"] == "vector(8)" and "lang" in columns
    assert embeddings.owners == ["team:search"] and embeddings.tags["domain"] == "support"
    index = specs[dg.AssetKey(["docs", "vector_index"])]
    assert index.metadata["dagster/uri"].endswith("/collections/docs")
    staging = specs[dg.AssetKey(["docs", "chunks"])]
    assert staging.tags["embedding_assets/stage"] == "staging"
    # UI materializations run in process like the sensor's runs.
    assert defs.resolve_implicit_global_asset_job_def().executor_def == dg.in_process_executor
    assert {s.name for s in defs.sensors} == {"docs_changes", "docs_lag"}
