"""`embedding-assets dev` (what `make dev` runs): embedded Postgres, the demo rows, and the
Dagster webserver + daemon whose sensor embeds them with no click; a sensor run killed with
-9 is failed and its slots freed with no manual step; Ctrl-C stops it all."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from embedding_assets_tests.conftest import free_port

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "embedding_assets.cli"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def kill_a_sensor_run_and_see_it_released(env: dict[str, str]) -> None:
    """kill -9 of a run the sensor launched: with no manual step, the run is failed and
    holds no pool slot within a few sensor ticks (it used to stay STARTED for good)."""
    import sqlalchemy as sa

    url = subprocess.run(
        [*CLI, "db", "url", "--dagster"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    engine = sa.create_engine(url)

    def started_run() -> tuple[str, int] | None:
        with engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT r.run_id, t.value FROM runs r JOIN run_tags t ON t.run_id = r.run_id "
                    "WHERE r.status = 'STARTED' AND t.key = 'embedding_assets/worker' LIMIT 1"
                )
            ).first()
        return (row.run_id, int(row.value.split("|")[1])) if row else None

    run_id, pid = wait_for(started_run, 120, "a run of the sensor in flight")
    os.kill(pid, signal.SIGKILL)

    def released() -> bool:
        with engine.connect() as conn:
            status = conn.scalar(
                sa.text("SELECT status FROM runs WHERE run_id = :r"), {"r": run_id}
            )
            slots = conn.scalar(
                sa.text("SELECT count(*) FROM concurrency_slots WHERE run_id = :r"),
                {"r": run_id},
            )
        return status == "FAILURE" and slots == 0

    wait_for(released, 60, "the killed run failed and its slots freed")
    engine.dispose()


def test_dev_embeds_the_demo_with_no_click_and_ctrl_c_stops_everything():
    home = Path(tempfile.mkdtemp(prefix="ea-dev-"))
    # The README's path: no DATABASE_URL, no Qdrant, the bundled demo source.
    unset = (
        "DATABASE_URL",
        "DAGSTER_HOME",
        "QDRANT_URL",
        "EMBEDDING_ASSETS_SOURCES",
        "EMBEDDING_ASSETS_DAGSTER_PG_URL",  # left by CLI tests in this process
    )
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(
        EMBEDDING_ASSETS_HOME=str(home),
        EMBEDDING_ASSETS_PG_PORT=str(free_port()),
        EMBEDDING_ASSETS_WORKER_PORT=str(free_port()),
    )
    ui_port = free_port()
    log = (home / "dev.log").open("w")
    dev = subprocess.Popen(
        [*CLI, "dev", "--port", str(ui_port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # so the test can Ctrl-C the whole group like a terminal
    )  # fmt: skip

    def status() -> dict | None:
        out = subprocess.run([*CLI, "status", "--json"], env=env, capture_output=True, text=True)
        return json.loads(out.stdout)[0] if out.returncode == 0 else None

    def webserver_up() -> bool:
        if dev.poll() is not None:
            pytest.fail((home / "dev.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/server_info") as response:
                return response.status == 200
        except OSError:
            return False

    try:
        wait_for(webserver_up, 120, "the webserver")
        first = wait_for(lambda: status(), 60, "status")
        assert first["eligible_rows"] >= 9000  # the bundled demo, loaded into Postgres
        # The sensor requests runs and the daemon executes them: vectors reach both sinks.
        done = wait_for(
            lambda: (s := status()) and s["qdrant_points"] > 0 and s,
            240,
            "the first shard embedded into pgvector and Qdrant",
        )
        assert done["embedded_rows"] > 0 and done["pgvector_chunks"] > 0
        kill_a_sensor_run_and_see_it_released(env)
    finally:
        os.killpg(dev.pid, signal.SIGINT)
        try:
            dev.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            raise
        finally:
            log.close()
    db = subprocess.run([*CLI, "db", "status", "--json"], env=env, capture_output=True, text=True)
    assert json.loads(db.stdout)["running"] is False, (home / "dev.log").read_text()[-3000:]
    # Nothing it started lives on: webserver, daemon, code server, worker.
    leftovers = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(home) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers
    shutil.rmtree(home, ignore_errors=True)
