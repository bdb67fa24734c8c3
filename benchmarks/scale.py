"""Scale figures: the cost of keeping a large table in sync when little changes, and of a
first load, against a throwaway embedded Postgres and the embedded Qdrant engine, with a free
embedder (benchmarks/free_embedder.py) so only the pipeline's own cost shows. Prints the
figures; asserts nothing.

    .venv/bin/python benchmarks/scale.py --rows 1000000 [--skip-dev]

Rows are real package descriptions (../shared/data/pypi_packages_100k.tsv.gz), repeated with
a numbered name past 100,000. Steps: first `sync` (a subprocess: wall time and its peak
RSS), then with nothing changed a warm sensor tick and `status`, then 100 updated rows and
`sync`, then a running `embedding-assets dev` stack: 100 updated rows from commit until both
sinks hold them (5 times, median).
"""

import argparse
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from throwaway import (
    TreeMemory,
    free_embedder_yaml,
    postgres_and_free_embedder,
    start_dev,
    stop_group,
    throwaway_home,
)

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pypi_packages_100k.tsv.gz"
CLI = [sys.executable, "-m", "embedding_assets.cli"]


def load_rows(engine, rows: int, data: Path) -> None:
    import sqlalchemy as sa

    lines = gzip.decompress(data.read_bytes()).decode().split("\n")[1:]
    records = [line.split("\t") for line in lines if line.count("\t") == 3]
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE bench_docs (id bigint PRIMARY KEY, name text NOT NULL, "
                "version text, summary text, notes text)"
            )
        )
        cursor = conn.connection.driver_connection.cursor()
        with cursor.copy("COPY bench_docs (id, name, version, summary) FROM STDIN") as copy:
            for i in range(rows):
                name, version, _month, summary = records[i % len(records)]
                suffix = f"-{i // len(records)}" if i >= len(records) else ""
                copy.write_row([i, name + suffix, version, summary])
        conn.execute(sa.text("ANALYZE bench_docs"))


def write_sources(path: Path, base_url: str, shards: int, max_rows: int) -> None:
    path.write_text(
        free_embedder_yaml(base_url)
        + f"""sources:
  - name: bench
    table: public.bench_docs
    id_column: id
    text: "{{name}}: {{summary}}"
    metadata: [version]
    embedder: free
    shards: {shards}
    max_rows_per_run: {max_rows}
"""
    )


def timed(command: list[str], env: dict, memory: list | None = None) -> tuple[float, str]:
    """Wall seconds and stdout of a command; with `memory` (a list), its TreeMemory is
    appended to it."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    sampler = TreeMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - started
    sampler.stop()
    if memory is not None:
        memory.append(sampler)
    out, err = stdout.decode(errors="replace"), stderr.decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{out[-2000:]}{err[-3000:]}")
    return seconds, out


def update_rows(engine, ids: list[int], marker: str) -> None:
    import sqlalchemy as sa

    with engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE bench_docs SET summary = summary || :m WHERE id = ANY(:ids)"),
            {"m": f" [{marker}]", "ids": ids},
        )


def in_both_sinks(engine, ids: list[int], marker: str) -> bool:
    """Every updated row's new text is in pgvector and the ledger says Qdrant holds it."""
    import sqlalchemy as sa

    with engine.connect() as conn:
        return conn.scalar(
            sa.text(
                """SELECT count(DISTINCT c.row_id) FROM public.bench_embeddings AS c
                JOIN embedding_assets.row_state AS r
                  ON r.target = 'public.bench_embeddings' AND r.row_id = c.row_id
                WHERE c.row_id = ANY(:ids) AND c.chunk_text LIKE :m
                  AND r.qdrant_hash = r.content_hash"""
            ),
            {"ids": [str(i) for i in ids], "m": f"%[{marker}]%"},
        ) == len(ids)


def sensor_tick_ms(settings, repeats: int = 10) -> tuple[float, str]:
    import dagster as dg

    from embedding_assets.definitions import build_definitions

    defs = build_definitions(settings)
    sensor = defs.resolve_sensor_def("bench_changes")
    timings = []
    cursor = None  # carried from tick to tick, as the daemon does (it times the sink audit)
    with dg.DagsterInstance.ephemeral() as instance:
        for i in range(repeats + 1):
            with dg.build_sensor_context(
                instance=instance, resources=defs.resources, definitions=defs, cursor=cursor
            ) as context:
                started = time.perf_counter()
                result = sensor.evaluate_tick(context)
                if i:  # the first tick is the warm-up (and audits the sinks, once a minute)
                    timings.append((time.perf_counter() - started) * 1000)
                cursor = result.cursor or cursor
    return statistics.median(timings), result.skip_message or f"{len(result.run_requests)} runs"


def dev_latencies(env: dict, engine, rows: int, repeats: int, updates: int) -> list[float]:
    home = Path(env["EMBEDDING_ASSETS_HOME"])
    dev = start_dev(home, env)
    latencies = []
    try:
        warm_ids = random.Random(0).sample(range(rows), 5)
        update_rows(engine, warm_ids, "warm")
        deadline = time.monotonic() + 300
        while not in_both_sinks(engine, warm_ids, "warm"):  # the stack is up and idle
            if time.monotonic() > deadline or dev.poll() is not None:
                raise SystemExit(f"dev stack did not sync; see {home / 'dev.log'}")
            time.sleep(0.5)
        for round_ in range(repeats):
            ids = random.Random(round_ + 1).sample(range(rows), updates)
            marker = f"dev{round_}"
            update_rows(engine, ids, marker)
            committed = time.perf_counter()
            while not in_both_sinks(engine, ids, marker):
                if time.perf_counter() - committed > 180:
                    raise SystemExit(f"round {round_} did not converge in 180 s")
                time.sleep(0.1)
            latencies.append(time.perf_counter() - committed)
            print(f"  dev round {round_}: {latencies[-1]:.1f} s", flush=True)
    finally:
        stop_group(dev)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--max-rows-per-run", type=int, default=20_000)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--dev-repeats", type=int, default=5)
    parser.add_argument("--skip-dev", action="store_true")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    home = throwaway_home("ea-scale-")

    from embedding_assets.cli.status import status_report
    from embedding_assets.config.settings import load_settings

    with postgres_and_free_embedder() as (engine, embedder):
        started = time.perf_counter()
        load_rows(engine, args.rows, args.data)
        print(f"loaded {args.rows} rows in {time.perf_counter() - started:.1f} s")
        sources = home / "sources.yaml"
        write_sources(sources, embedder.base_url, args.shards, args.max_rows_per_run)
        os.environ["EMBEDDING_ASSETS_SOURCES"] = str(sources)
        env = dict(os.environ)
        settings = load_settings(sources)

        memory: list[TreeMemory] = []
        seconds, out = timed([*CLI, "sync", "--json"], env, memory)
        reports = json.loads(out.strip().splitlines()[-1])
        done = sum(r["rows"] for r in reports)
        index = sum(r.get("index_build_seconds", 0) for r in reports)
        print(
            f"first sync: {seconds:.1f} s for {done} rows in {len(reports)} runs = "
            f"{done / seconds:,.0f} rows/s; without the one HNSW build ({index:.1f} s): "
            f"{done / (seconds - index):,.0f} rows/s; peak of the sync's process tree: RSS "
            f"{memory[0].peak_rss_mb:,.0f} MB, anonymous {memory[0].peak_anon_mb:,.0f} MB "
            f"(max_rows_per_run {args.max_rows_per_run}); all runs ok: "
            f"{all(r['success'] for r in reports)}"
        )

        tick_ms, said = sensor_tick_ms(settings)
        print(f"sensor tick, nothing changed (warm, median of 10): {tick_ms:.1f} ms ({said})")
        started = time.perf_counter()
        report = status_report(settings, "bench")
        status_in_process = time.perf_counter() - started
        status_cli, _ = timed([*CLI, "status", "--json"], env)
        print(
            f"status, nothing changed: {status_in_process:.2f} s in-process, "
            f"{status_cli:.2f} s as a command (exact={report['exact']}, "
            f"pending={report['pending_rows']}, embedded={report['embedded_rows']})"
        )
        from embedding_assets.ops.environment import qdrant_store_from_env

        started = time.perf_counter()
        points = qdrant_store_from_env().count("bench")
        print(
            f"embedded Qdrant, opening the collection and counting {points} points: "
            f"{time.perf_counter() - started:.2f} s (every run process pays the opening)"
        )
        from embedding_assets.destinations.audit import audit_destinations
        from embedding_assets.ops.environment import database_url
        from embedding_assets.sync.generations import runtime_for

        runtime = runtime_for(settings, "bench", database_url())
        for deep in (False, True):
            started = time.perf_counter()
            audits = audit_destinations(runtime, qdrant="skip", repair=False, deep=deep)
            print(
                f"sink audit against the ledger ({'checksums' if deep else 'counts'}, "
                f"pgvector only): {time.perf_counter() - started:.2f} s, "
                f"{sum(a.pgvector_chunks for a in audits)} chunks"
            )
        started = time.perf_counter()
        exact = status_report(settings, "bench", exact=True)
        print(
            f"status --exact (full diff): {time.perf_counter() - started:.2f} s in-process "
            f"(eligible={exact['eligible_rows']}, pending={exact['pending_rows']})"
        )

        ids = random.Random(42).sample(range(args.rows), args.updates)
        update_rows(engine, ids, "sync")
        seconds, out = timed([*CLI, "sync", "--json"], env, memory)
        runs = json.loads(out.strip().splitlines()[-1])
        print(
            f"{args.updates} updated rows, `sync` start to exit: {seconds:.1f} s "
            f"({len(runs)} shards, {sum(r['rows'] for r in runs)} rows; converged: "
            f"{in_both_sinks(engine, ids, 'sync')}); peak RSS {memory[1].peak_rss_mb:,.0f} MB, "
            f"anonymous {memory[1].peak_anon_mb:,.0f} MB"
        )

        if not args.skip_dev:
            latencies = dev_latencies(env, engine, args.rows, args.dev_repeats, args.updates)
            print(
                f"dev stack, {args.updates} updated rows from commit to both sinks: median "
                f"{statistics.median(latencies):.1f} s (all: "
                f"{', '.join(f'{s:.1f}' for s in latencies)})"
            )
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
