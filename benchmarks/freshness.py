"""Freshness on the dev stack's defaults (issues 11 and 23): `embedding-assets dev` (the bundled
demo, the worker, the live lane, Dagster's daemon and sensors), left to finish embedding the
demo, then:

  1. the live lane's CPU while idle;
  2. single inserts, apart: commit -> the row in the pgvector view and in Qdrant (the ledger's
     `qdrant_hash` equal to the stored content hash: recorded only after Qdrant applied the
     points), then, untimed, `search --backend qdrant` finds it as the top hit;
  3. updates and deletes of those rows, apart: commit -> both sinks reflect it;
  4. 100 rows inserted in one transaction -> all in both sinks;
  5. the lane killed -9, then single inserts: commit -> both sinks, through the sensor's
     runs; then a new lane started, and single inserts through it again;
  6. single inserts while a generation build re-embeds the demo through the same worker
     (`sync` of a copy of sources.yaml with another template, in its own process);
  7. the worker killed for `--outage` seconds while rows arrive, then back: the seconds
     from its first answer until every row is in both sinks.

`--no-live` runs 2-4 without the lane (the sensor's path, for comparison). Prints figures;
asserts nothing.

    .venv/bin/python benchmarks/freshness.py [--inserts 10] [--no-live]
"""

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import time

from failures import CLI, cli, converged, status, wait_until
from throwaway import free_port, stop_group, throwaway_home

SUMMARY = "a freshly published package about {topic}"


def in_both_sinks(engine, row_id: str, text: str | None = None) -> bool:
    """The row is in the view (with `text`, if given) and Qdrant has its current points."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        return bool(
            conn.scalar(
                sa.text(
                    """SELECT EXISTS (SELECT 1 FROM public.pypi_packages_embeddings
                        WHERE row_id = :r AND (CAST(:t AS text) IS NULL OR chunk_text = :t))
                    AND EXISTS (SELECT 1 FROM embedding_assets.row_state
                        WHERE row_id = :r AND NOT deleted AND qdrant_hash = content_hash)"""
                ),
                {"r": row_id, "t": text},
            )
        )


def gone_from_both_sinks(engine, row_id: str) -> bool:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return not conn.scalar(
            sa.text(
                """SELECT EXISTS (SELECT 1 FROM public.pypi_packages_embeddings WHERE row_id = :r)
                OR EXISTS (SELECT 1 FROM embedding_assets.row_state
                    WHERE row_id = :r AND qdrant_chunk_count > 0)"""
            ),
            {"r": row_id},
        )


def timed(engine, statement: str, params: list[dict], done, limit: float = 180) -> float:
    """Seconds from the commit of `statement` (once per params, one transaction) to `done()`."""
    import sqlalchemy as sa

    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)
    committed = time.perf_counter()
    while not done():
        if time.perf_counter() - committed > limit:
            return float("inf")
        time.sleep(0.02)
    return time.perf_counter() - committed


INSERT = (
    "INSERT INTO public.pypi_packages (name, version, month, summary) "
    "VALUES (:n, '1.0', '2026-12', :s)"
)


def single_inserts(engine, prefix: str, count: int, gap: float = 2.0) -> list[float]:
    seconds = []
    for i in range(count):
        name, summary = f"{prefix}-{i}", SUMMARY.format(topic=f"{prefix} {i}")
        stored = functools.partial(in_both_sinks, engine, name)
        seconds.append(timed(engine, INSERT, [{"n": name, "s": summary}], stored))
        time.sleep(gap)  # apart, as single edits arrive
    return seconds


def figures(label: str, seconds: list[float]) -> None:
    ordered = sorted(seconds)
    p95 = ordered[max(0, int(round(0.95 * len(ordered))) - 1)]
    print(
        f"{label}: median {statistics.median(ordered):.2f} s, p95 {p95:.2f} s, "
        f"max {ordered[-1]:.2f} s ({len(ordered)})",
        flush=True,
    )


def lane_pid(engine) -> int | None:
    import sqlalchemy as sa

    with engine.connect() as conn:
        lane = conn.scalar(
            sa.text(
                "SELECT lane FROM embedding_assets.live_lanes "
                "WHERE heartbeat_at > now() - interval '3 seconds' ORDER BY heartbeat_at DESC"
            )
        )
    return int(lane.rsplit(":", 1)[1]) if lane else None


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def top_hit(row_id: str, text: str) -> bool:
    done = cli("search", text, "--backend", "qdrant", "-k", "1", "--json")
    hits = json.loads(done.stdout or "[]")
    return bool(hits) and hits[0]["row_id"] == row_id


def start_build(home) -> subprocess.Popen:
    """A generation build of the demo (another template) through the same worker."""
    from embedding_assets.config.settings import BUNDLED_SOURCES

    edited = home / "build.yaml"
    text = BUNDLED_SOURCES.read_text().replace('"{name}: {summary}"', '"{summary} ({name})"')
    manual = "    generations: {promote: manual}\n    shards: 8"
    edited.write_text(text.replace("    shards: 8", manual))
    log = (home / "build.log").open("w")
    return subprocess.Popen(
        [*CLI, "--sources", str(edited), "sync", "--source", "pypi_packages"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def build_rows(engine) -> int:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.text(
                    "SELECT count(*) FROM embedding_assets.row_state AS s "
                    "JOIN embedding_assets.generations AS g ON g.target = s.target "
                    "WHERE g.state = 'building' AND s.content_hash IS NOT NULL"
                )
            )
        )


def scenarios(engine, home, inserts: int, live: bool, outage_seconds: float) -> None:
    if live:
        pid = lane_pid(engine)
        before, started = cpu_seconds(pid), time.perf_counter()
        time.sleep(30)
        share = (cpu_seconds(pid) - before) / (time.perf_counter() - started)
        print(f"[1] idle live lane (pid {pid}): {100 * share:.2f}% of a core over 30 s")
    figures("[2] insert -> both sinks", single_inserts(engine, "probe", inserts))
    last = f"probe-{inserts - 1}"
    found = top_hit(last, SUMMARY.format(topic=last.replace("-", " ")))
    print(f"    {last} is the top hit of a Qdrant search: {found}")
    updates, deletes = [], []
    for i in range(inserts):
        name, text = f"probe-{i}", f"an updated description number {i}"
        updates.append(
            timed(
                engine,
                "UPDATE public.pypi_packages SET summary = :s WHERE name = :n",
                [{"n": name, "s": text}],
                functools.partial(in_both_sinks, engine, name, f"{name}: {text}"),
            )
        )
        time.sleep(1)
        deletes.append(
            timed(
                engine,
                "DELETE FROM public.pypi_packages WHERE name = :n",
                [{"n": name}],
                functools.partial(gone_from_both_sinks, engine, name),
            )
        )
        time.sleep(1)
    figures("[3] update -> both sinks", updates)
    figures("    delete -> both sinks", deletes)
    batch = [{"n": f"batch-{i}", "s": SUMMARY.format(topic=f"batch {i}")} for i in range(100)]
    seconds = timed(
        engine, INSERT, batch, lambda: all(in_both_sinks(engine, r["n"]) for r in batch[::-1])
    )
    print(f"[4] 100 rows in one transaction -> all in both sinks: {seconds:.2f} s", flush=True)
    if not live:
        return
    lane = failover(engine, home, inserts)
    try:
        during_build(engine, home, inserts)
        outage(engine, home, outage_seconds)
    finally:
        stop_group(lane)


def outage(engine, home, seconds: float) -> None:
    """The worker down `seconds` while rows arrive one at a time, then back: how long after
    it answers again until every row is in both sinks."""
    import urllib.request

    import psutil
    import sqlalchemy as sa

    from embedding_assets.cli.serve import worker_port, worker_url

    port = str(worker_port())
    for process in psutil.process_iter(["cmdline"]):
        if "serve" in (process.info["cmdline"] or []) and port in process.info["cmdline"]:
            process.kill()
    down_at = time.perf_counter()
    names = []
    while time.perf_counter() - down_at < seconds - 10:
        names.append(f"outage-{len(names)}")
        with engine.begin() as conn:
            conn.execute(sa.text(INSERT), {"n": names[-1], "s": SUMMARY.format(topic=names[-1])})
        time.sleep(5)
    time.sleep(max(0.0, seconds - (time.perf_counter() - down_at)))
    worker = subprocess.Popen(
        [*CLI, "serve", "--port", port],
        stdout=(home / "worker2.log").open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"{worker_url()[:-3]}/health", timeout=1):
                return True
        except OSError:
            return False

    wait_until(answers, 180, 0.1)
    back = time.perf_counter()
    print(
        f"[7] worker down {back - down_at:.0f} s (killed, restarted after {seconds:.0f} s, "
        f"answering {back - down_at - seconds:.0f} s later); {len(names)} rows inserted "
        "meanwhile",
        flush=True,
    )
    done = wait_until(lambda: all(in_both_sinks(engine, n) for n in names), 600, 0.5)
    waited = time.perf_counter() - back
    print(
        f"    every one in both sinks {waited:.1f} s after the worker answered"
        if done
        else "    NOT all stored 600 s after the worker answered"
    )
    worker_left.append(worker)


worker_left: list[subprocess.Popen] = []  # the restarted worker, stopped with the stack


def failover(engine, home, inserts: int) -> subprocess.Popen:
    """Kill -9 the lane `dev` started, measure the sensor's runs taking over, then start a
    lane again (as a supervisor would) and measure it taking over back. Returns it."""
    pid = lane_pid(engine)
    os.kill(pid, signal.SIGKILL)
    print(f"[5] live lane (pid {pid}) killed -9; the sensor's interval is 2 s", flush=True)
    figures("    insert -> both sinks by the sensor's runs", single_inserts(engine, "killed", 5))
    with (home / "lane.log").open("w") as log:
        lane = subprocess.Popen(
            [*CLI, "live"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    started = time.perf_counter()
    wait_until(lambda: lane_pid(engine) == lane.pid, 120, 0.2)
    print(f"    a new lane is up {time.perf_counter() - started:.1f} s after its start")
    figures("    insert -> both sinks, the lane back", single_inserts(engine, "back", inserts))
    return lane


def during_build(engine, home, inserts: int) -> None:
    build = start_build(home)
    try:
        wait_until(lambda: build_rows(engine) > 0, 300, 0.5)
        print(f"[6] a generation build is running ({build_rows(engine)} rows built so far)")
        during = single_inserts(engine, "during-build", inserts, gap=1.0)
        print(
            f"    build rows done when the probes ended: {build_rows(engine)}; build still "
            f"running: {build.poll() is None}"
        )
        figures("    insert -> both sinks during the build", during)
    finally:
        stop_group(build)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inserts", type=int, default=10)
    parser.add_argument("--no-live", action="store_true")
    parser.add_argument("--outage", type=float, default=120.0, help="seconds the worker is down")
    args = parser.parse_args()
    home = throwaway_home("ea-freshness-", EMBEDDING_ASSETS_WORKER_PORT=str(free_port()))
    with (home / "dev.log").open("w") as log:
        dev = subprocess.Popen(
            [*CLI, "dev", "--port", str(free_port()), *(["--no-live"] if args.no_live else [])],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if not wait_until(lambda: cli("status", "--json").returncode == 0, 300):
            raise SystemExit(f"dev did not come up; see {home / 'dev.log'}")
        started = time.perf_counter()
        if not wait_until(lambda: converged(status()), 900, every=2):
            raise SystemExit(f"the demo did not finish embedding; see {home / 'dev.log'}")
        print(f"demo embedded {time.perf_counter() - started:.0f} s after dev answered")
        from embedding_assets.ops.environment import database_url
        from embedding_assets.state.db import engine_for

        scenarios(engine_for(database_url()), home, args.inserts, not args.no_live, args.outage)
    finally:
        stop_group(dev)
        for worker in worker_left:
            stop_group(worker)
        # The CLI calls above started the embedded server before `dev`, which then leaves it.
        from embedding_assets.ops.embedded_postgres import EmbeddedPostgres

        EmbeddedPostgres.from_env().stop()


if __name__ == "__main__":
    main()
