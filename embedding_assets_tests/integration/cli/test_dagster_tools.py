"""Dagster's own tools in the repo root, with nothing exported (no DAGSTER_HOME, no
DATABASE_URL, no instance URL): the instance storage finds the embedded Postgres or starts
it, `dg` sees a project, and `dg dev` serves the asset graph. Sensors of the bundled demo say
how to load its rows instead of failing."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from embedding_assets_tests.conftest import free_port
from embedding_assets_tests.integration.cli.test_dev import dev_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent


def tool(env: dict[str, str], *command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / command[0]), *command[1:]],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def graphql(port: int, query: str) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"]


def poll(fetch, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if found := fetch():
                return found
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"nothing after {timeout}s")


SENSOR_TICK = """{ sensorOrError(sensorSelector: {repositoryName: "__repository__",
    repositoryLocationName: "embedding_assets", sensorName: "pypi_packages_changes"}) {
    ... on Sensor { sensorState { ticks(limit: 1) { status skipReason error { message } } } } } }"""


def finished_tick(answer: dict) -> dict | None:
    """The sensor's latest tick once it has finished (not while it is STARTED)."""
    ticks = answer["sensorOrError"]["sensorState"]["ticks"]
    return ticks[0] if ticks and ticks[0]["status"] != "STARTED" else None


def test_dagster_and_dg_work_in_the_repo_root_with_nothing_exported(tmp_path) -> None:
    env = dev_env(tmp_path / "home")
    try:
        validated = tool(env, "dagster", "definitions", "validate")
        assert validated.returncode == 0, validated.stderr[-3000:]
        assert "started embedded Postgres" in validated.stderr
        checked = tool(env, "dg", "check", "defs")
        assert checked.returncode == 0, checked.stderr[-3000:]
        assert "All definitions loaded successfully" in checked.stdout + checked.stderr
        listed = tool(env, "dg", "list", "defs", "--json")
        assert listed.returncode == 0, listed.stderr[-3000:]
        assets = {a["asset_key"] for a in json.loads(listed.stdout)["assets"]}
        assert {"pypi_packages/pending_rows", "pypi_packages/vector_index"} <= assets
        components = tool(env, "dg", "list", "components")
        assert "embedding_assets.EmbeddingSync" in components.stdout, components.stderr[-3000:]

        port = free_port()
        dev = subprocess.Popen(
            [str(BIN / "dg"), "dev", "-p", str(port)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            nodes = poll(lambda: graphql(port, "{ assetNodes { assetKey { path } } }"), 120)
            paths = {"/".join(n["assetKey"]["path"]) for n in nodes["assetNodes"]}
            assert "pypi_packages/embeddings" in paths
            # No demo rows (`dg dev` loads none): the sensor says how to load them.
            tick = poll(lambda: finished_tick(graphql(port, SENSOR_TICK)), 120)
            assert tick["status"] == "SKIPPED", tick
            assert "embedding-assets db demo" in tick["skipReason"]
        finally:
            os.killpg(dev.pid, signal.SIGINT)
            try:
                dev.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(dev.pid, signal.SIGKILL)
    finally:
        subprocess.run(
            [sys.executable, "-m", "embedding_assets.cli", "db", "stop"],
            env=env,
            capture_output=True,
        )
