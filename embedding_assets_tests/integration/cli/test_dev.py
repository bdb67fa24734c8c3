"""`embedding-assets dev` (what `make dev` runs): embedded Postgres, the demo rows, and the
Dagster webserver + daemon whose sensor embeds them with no click; a sensor run killed with
-9 is failed and its slots freed with no manual step. In headless Chromium: the source's
graph, shards shown late while the sensor is stopped, one shard materialized from the UI.
SIGINT and SIGTERM stop it all, even started in the background; the output stays quiet."""

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

    engine = dagster_engine(env)

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


CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(os.environ.get("EMBEDDING_ASSETS_TEST_ARTIFACTS", tempfile.gettempdir()))


BROWSER_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def in_the_browser(ui_port: int, what: str, steps) -> None:
    """Run `steps(page)` in headless Chromium (Debian's, driven by Playwright; no browser
    download); a screenshot is kept on failure."""
    from playwright.sync_api import sync_playwright

    shot = ARTIFACTS / f"dev-ui-{what.replace(' ', '-')}-{ui_port}.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            steps(page)
        except Exception as exc:
            page.screenshot(path=str(shot), full_page=True)
            raise AssertionError(f"in the UI, {what} failed; screenshot: {shot}") from exc
        finally:
            browser.close()


def dagster_engine(env: dict[str, str]):
    import sqlalchemy as sa

    url = subprocess.run(
        [*CLI, "db", "url", "--dagster"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return sa.create_engine(url)


def run_statuses(engine, job: str, partition: str | None = None) -> list[str]:
    import sqlalchemy as sa

    query = "SELECT r.status FROM runs r WHERE r.pipeline_name = :job"
    if partition is not None:
        query += (
            " AND EXISTS (SELECT 1 FROM run_tags t WHERE t.run_id = r.run_id"
            " AND t.key = 'dagster/partition' AND t.value = :partition)"
        )
    with engine.connect() as conn:
        return list(conn.scalars(sa.text(query), {"job": job, "partition": partition}))


def finished(statuses: list[str]) -> bool:
    return bool(statuses) and all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in statuses)


def ui_shows_the_source_graph(page, ui_port: int, group: str) -> None:
    """The source's group: the source table and the four assets."""
    page.goto(f"http://127.0.0.1:{ui_port}/asset-groups/{group}")
    for label in ("source", "pending_rows", "chunks", "embeddings", "vector_index"):
        page.get_by_text(label, exact=True).first.wait_for()


def ui_freshness_partitions(page, ui_port: int, group: str, failed: int, passed: int) -> None:
    """The `freshness` check's partitions tab counts the late shards as failed."""
    page.goto(f"http://127.0.0.1:{ui_port}/assets/{group}/embeddings?view=checks")
    page.get_by_text("freshness", exact=True).first.click()
    page.get_by_text("Partitions", exact=True).last.click()
    page.get_by_text(f"Failed ({failed})", exact=True).wait_for()
    page.get_by_text(f"Passed ({passed})", exact=True).wait_for()


def ui_materializes_one_shard(page, ui_port: int, group: str, shard: str) -> None:
    """ "Materialize all" on the group, one shard, "Launch 1 run"."""
    page.goto(f"http://127.0.0.1:{ui_port}/asset-groups/{group}")
    page.get_by_role("button", name="Materialize all").first.click()
    page.get_by_text("Select a partition or create one").click()
    page.keyboard.type(shard)
    page.get_by_text(shard, exact=True).filter(visible=True).first.click()
    page.get_by_text("1 partition", exact=True).wait_for()
    page.get_by_text("Launch runs to materialize").click()  # closes the drop-down
    page.get_by_role("button", name="Launch 1 run").click()
    page.get_by_role("button", name="Launch 1 run").wait_for(state="detached")


def dev_env(home: Path) -> dict[str, str]:
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
    return env


def dev_with_sources(home: Path, sources: str):
    """The environment of a `dev` on `sources` (written to home/sources.yaml), with its
    embedded Postgres started, and an engine on its data database."""
    import sqlalchemy as sa

    env = dev_env(home)
    (home / "sources.yaml").write_text(sources)
    env["EMBEDDING_ASSETS_SOURCES"] = str(home / "sources.yaml")
    subprocess.run([*CLI, "db", "start"], env=env, check=True, capture_output=True)
    data_url = subprocess.run(
        [*CLI, "db", "url"], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    return env, sa.create_engine(data_url)


def start_dev(home: Path, env: dict[str, str], ignore_sigint: bool = False):
    ui_port = free_port()

    def background() -> None:
        # What `dev &` in a script gets: SIGINT ignored, inherited.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    log = (home / "dev.log").open("w")
    dev = subprocess.Popen(
        [*CLI, "dev", "--port", str(ui_port)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,  # so the test can Ctrl-C the whole group like a terminal
        preexec_fn=background if ignore_sigint else None,
    )  # fmt: skip
    log.close()
    return dev, ui_port


def wait_for_webserver(dev: subprocess.Popen, home: Path, ui_port: int) -> None:
    def webserver_up() -> bool:
        if dev.poll() is not None:
            pytest.fail((home / "dev.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/server_info") as response:
                return response.status == 200
        except OSError:
            return False

    wait_for(webserver_up, 120, "the webserver")


def assert_stopped_cleanly(dev: subprocess.Popen, home: Path, env: dict) -> None:
    db = subprocess.run([*CLI, "db", "status", "--json"], env=env, capture_output=True, text=True)
    assert json.loads(db.stdout)["running"] is False, (home / "dev.log").read_text()[-3000:]
    # Nothing it started lives on: webserver, daemon, code server, worker.
    leftovers = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if str(home) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers
    assert dev.returncode == 0, (home / "dev.log").read_text()[-3000:]


NOTES_SOURCES = """
embedders:
  worker:
    provider: openai
    model: all-MiniLM-L6-v2
    base_urls: ["http://127.0.0.1:${EMBEDDING_ASSETS_WORKER_PORT}/v1"]
sources:
  - name: notes
    table: public.notes
    text: "{body}"
    embedder: worker
    shards: 4
    sensor_status: stopped
    freshness_seconds: 1
"""


def test_dev_ui_shows_late_shards_materializes_one_and_stops_on_sigterm():
    """With the changes sensor stopped, rows wait: the UI's `freshness` check fails for
    every shard; one shard materialized from the UI (Materialize all, one partition) turns
    it green. Then SIGTERM, as a supervisor (systemd, a container, nohup) sends it to the
    process alone, even with SIGINT ignored."""
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: `apt-get install -y chromium` runs the browser test")
    import sqlalchemy as sa

    home = Path(tempfile.mkdtemp(prefix="ea-dev-ui-"))
    env, data = dev_with_sources(home, NOTES_SOURCES)
    with data.begin() as conn:
        conn.execute(sa.text("CREATE TABLE notes (id int PRIMARY KEY, body text)"))
        conn.execute(
            sa.text(
                "INSERT INTO notes SELECT g, 'note ' || g || ' about ' || md5(g::text) "
                "FROM generate_series(1, 40) g"
            )
        )
    data.dispose()
    dev, ui_port = start_dev(home, env, ignore_sigint=True)
    try:
        wait_for_webserver(dev, home, ui_port)
        dagster = dagster_engine(env)
        # The lag sensor finds the 4 shards late and runs their `freshness` check.
        wait_for(
            lambda: finished(run_statuses(dagster, "notes_freshness")), 150, "the freshness run"
        )

        def late_then_one_shard_materialized(page) -> None:
            ui_shows_the_source_graph(page, ui_port, "notes")
            ui_freshness_partitions(page, ui_port, "notes", failed=4, passed=0)
            ui_materializes_one_shard(page, ui_port, "notes", "00")
            ui_run = wait_for(
                lambda: finished(s := run_statuses(dagster, "__ASSET_JOB", "00")) and s,
                180,
                "the UI's run of shard 00",
            )
            assert ui_run == ["SUCCESS"]
            ui_freshness_partitions(page, ui_port, "notes", failed=3, passed=1)

        in_the_browser(
            ui_port, "late shards and a UI materialization", late_then_one_shard_materialized
        )
        dagster.dispose()
        dev.send_signal(signal.SIGTERM)
        dev.wait(timeout=90)
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
        subprocess.run([*CLI, "db", "stop"], env=env, capture_output=True)
    log = (home / "dev.log").read_text()
    assert "stopped by SIGTERM" in log
    assert_quiet(log)
    assert_stopped_cleanly(dev, home, env)
    shutil.rmtree(home, ignore_errors=True)


def assert_quiet(log: str) -> None:
    """Quiet by default: no preview or supersession warnings, no warning about the
    checkout's dagster.yaml, no per-event DEBUG lines of any run (the UI's included)."""
    for noise in ("PreviewWarning", "SupersessionWarning", "dagster.yaml", " - DEBUG - "):
        assert noise not in log, (noise, log[-3000:])


def test_dev_embeds_the_demo_with_no_click_and_ctrl_c_stops_everything():
    home = Path(tempfile.mkdtemp(prefix="ea-dev-"))
    env = dev_env(home)
    # Started as `dev &` would be (SIGINT ignored): a SIGINT to the process still stops it.
    dev, ui_port = start_dev(home, env, ignore_sigint=True)

    def status() -> dict | None:
        out = subprocess.run([*CLI, "status", "--json"], env=env, capture_output=True, text=True)
        return json.loads(out.stdout)[0] if out.returncode == 0 else None

    try:
        wait_for_webserver(dev, home, ui_port)
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
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(dev.pid, signal.SIGKILL)
            raise
    log = (home / "dev.log").read_text()
    assert "stopped by SIGINT" in log
    assert_quiet(log)
    assert_stopped_cleanly(dev, home, env)
    shutil.rmtree(home, ignore_errors=True)


EDITED_SOURCES = """
embedders:
  worker:
    provider: openai
    model: all-MiniLM-L6-v2
    base_urls: ["http://127.0.0.1:${{EMBEDDING_ASSETS_WORKER_PORT}}/v1"]
sources:
  - name: edits
    table: public.edits
    text: "{{body}}"
    embedder: worker
    shards: 2
    where: "{where}"
    {extra}
"""


def test_dev_follows_edits_of_sources_yaml_and_survives_a_broken_file():
    """While `dev` runs: a `where` edit saved to sources.yaml reloads the code location and
    the sensor moves the store to the new rows with no manual step; a broken file prints one
    line, starts nothing and deletes nothing; the fixed file converges by itself."""
    import sqlalchemy as sa

    home = Path(tempfile.mkdtemp(prefix="ea-dev-edits-"))
    sources = home / "sources.yaml"
    env, data = dev_with_sources(home, EDITED_SOURCES.format(where="id <= 20", extra=""))
    with data.begin() as conn:
        conn.execute(sa.text("CREATE TABLE edits (id int PRIMARY KEY, body text)"))
        conn.execute(
            sa.text("INSERT INTO edits SELECT g, 'edit note ' || g FROM generate_series(1, 40) g")
        )

    def stored() -> set[int]:
        with data.connect() as conn:
            if conn.scalar(sa.text("SELECT to_regclass('public.edits_embeddings')")) is None:
                return set()
            return {int(r) for r in conn.scalars(sa.text("SELECT row_id FROM edits_embeddings"))}

    dev, ui_port = start_dev(home, env)
    timings = {}
    try:
        wait_for_webserver(dev, home, ui_port)
        wait_for(lambda: stored() == set(range(1, 21)), 240, "rows 1-20 embedded by the sensor")

        started = time.monotonic()
        sources.write_text(EDITED_SOURCES.format(where="id > 20", extra=""))
        wait_for(lambda: stored() == set(range(21, 41)), 120, "the where edit applied")
        timings["where edit"] = time.monotonic() - started
        assert "code location reloaded" in (home / "dev.log").read_text()

        lines_before = len((home / "dev.log").read_text().splitlines())
        sources.write_text(EDITED_SOURCES.format(where="id > 30", extra="bogus_key: 1"))
        time.sleep(15)  # several sensor ticks with the broken file
        log = (home / "dev.log").read_text().splitlines()[lines_before:]
        assert any("bogus_key" in line for line in log), log
        assert len(log) <= 3 and not any("Traceback" in line for line in log), log
        assert stored() == set(range(21, 41))  # nothing started, nothing deleted

        started = time.monotonic()
        sources.write_text(EDITED_SOURCES.format(where="id > 30", extra=""))
        wait_for(lambda: stored() == set(range(31, 41)), 120, "the fixed file applied")
        timings["fixed file"] = time.monotonic() - started
        print("seconds to converge:", timings)
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=90)
        finally:
            if dev.poll() is None:
                os.killpg(dev.pid, signal.SIGKILL)
            data.dispose()
            subprocess.run([*CLI, "db", "stop"], env=env, capture_output=True)
    assert_stopped_cleanly(dev, home, env)
    shutil.rmtree(home, ignore_errors=True)
