"""The code location loads: every source's assets, checks, jobs, sensor and schedule."""

import dagster as dg

from embedding_assets.definitions import build_definitions
from embedding_assets.settings import load_settings


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
    assert sensor.minimum_interval_seconds == 5


def test_reconcile_schedule_is_off_when_its_cron_is_null(tmp_path):
    path = tmp_path / "sources.yaml"
    path.write_text(
        "embedders: {local: {provider: sentence_transformers}}\n"
        "sources: [{name: docs, table: docs, text: '{body}', reconcile: {cron: null}}]\n"
    )
    repository = build_definitions(load_settings(path)).get_repository_def()
    assert "docs_reconcile" in repository.job_names
    assert not repository.schedule_defs
