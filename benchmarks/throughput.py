"""End-to-end throughput against the one-liner a user would otherwise write (issue 9): a bare
`SentenceTransformer.encode(texts, batch_size=32)` of the same texts, then
`embedding-assets sync` of a fresh table holding them (a subprocess: process start,
Dagster, every shard run), side by side in one run, on a throwaway embedded Postgres and
Qdrant store. Rows are package descriptions from ../shared/data (the last N rows of the
file, which the tests never use), composed as `{name}: {description}`. Prints figures and,
per stage, where the seconds of the runs went (Dagster's step timings); asserts nothing.

    .venv/bin/python benchmarks/throughput.py [--rows 4000] [--shards 8]
"""

import argparse
import gzip
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from throwaway import throwaway_home

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pypi_packages_100k.tsv.gz"
CLI = [sys.executable, "-m", "embedding_assets.cli"]


def unseen_rows(count: int) -> list[tuple[str, str]]:
    lines = gzip.decompress(DATA.read_bytes()).decode().split("\n")[1:]
    records = [line.split("\t") for line in lines if line.count("\t") == 3]
    return [(name, summary) for name, _, _, summary in records[-count:]]


def bare_encode(texts: list[str]) -> float:
    """texts/s of SentenceTransformer.encode(batch_size=32), model loaded beforehand."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder().load()
    model.encode(texts[:64], batch_size=32)  # warm-up
    started = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - started)


def step_breakdown(dagster_home: Path) -> dict[str, float]:
    """Seconds per step kind over every run in the instance, plus run overhead."""
    import dagster as dg

    totals: dict[str, float] = defaultdict(float)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for record in instance.get_run_records():
            run = record.dagster_run
            stats = instance.get_run_stats(run.run_id)
            run_seconds = (stats.end_time or 0) - (stats.start_time or 0)
            steps = 0.0
            for step in instance.get_run_step_stats(run.run_id):
                seconds = (step.end_time or 0) - (step.start_time or 0)
                kind = step.step_key.split("__", 1)[-1]
                kind = "checks" if kind.startswith(("embeddings_", "vector_index_")) else kind
                totals[kind] += seconds
                steps += seconds
            totals["run start/stop (outside steps)"] += max(0.0, run_seconds - steps)
            totals["runs"] += 1
    return dict(totals)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument(
        "--profile", type=Path, help="run the sync under cProfile and write its stats here"
    )
    args = parser.parse_args()
    home = throwaway_home("ea-throughput-")

    import sqlalchemy as sa

    from embedding_assets.cli import ensure_database
    from embedding_assets.environment import prepare_dagster_home
    from embedding_assets.state.db import engine_for

    rows = unseen_rows(args.rows)
    texts = [f"{name}: {summary}" for name, summary in rows]
    url = ensure_database()
    with engine_for(url).begin() as conn:
        conn.execute(
            sa.text("CREATE TABLE bench (id int PRIMARY KEY, name text, description text)")
        )
        conn.execute(
            sa.text("INSERT INTO bench VALUES (:i, :n, :d)"),
            [{"i": i, "n": n, "d": d} for i, (n, d) in enumerate(rows)],
        )
    sources = home / "sources.yaml"
    sources.write_text(
        textwrap.dedent(
            f"""\
            embedders:
              local: {{provider: sentence_transformers}}
            sources:
              - {{name: bench, table: bench, text: "{{name}}: {{description}}",
                 shards: {args.shards}}}
            """
        )
    )

    bare = bare_encode(texts)
    started = time.perf_counter()
    if args.profile:
        seconds = profiled_sync(sources, args.profile)
    else:
        done = subprocess.run(
            [*CLI, "--sources", str(sources), "sync"], capture_output=True, text=True
        )
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stderr[-3000:])
    synced = len(rows) / seconds
    print(f"rows: {len(rows)}, shards: {args.shards}")
    print(f"bare encode(batch_size=32): {bare:7.1f} texts/s")
    ratio = synced / bare
    print(f"sync (in-process model):    {synced:7.1f} rows/s = {ratio:.2f}x  ({seconds:.1f} s)")
    breakdown = step_breakdown(prepare_dagster_home())
    runs = int(breakdown.pop("runs", 0))
    print(f"where the {runs} runs' seconds went (summed over runs):")
    for kind, value in sorted(breakdown.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:34} {value:7.2f} s")
    subprocess.run([*CLI, "db", "stop"], check=False, capture_output=True)
    if args.profile:
        import pstats

        print(f"profile of the in-process sync ({args.profile}):")
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"embedding_assets", 40)


def profiled_sync(sources: Path, out: Path) -> float:
    """The sync in this process (the model already loaded), under cProfile: Dagster's
    in-process executor runs every step in this thread, so the profile sees them all."""
    import cProfile

    import dagster as dg

    from embedding_assets.cli import sync_source
    from embedding_assets.environment import prepare_dagster_home
    from embedding_assets.instance_connections import pool_instance_connections
    from embedding_assets.settings import load_settings

    prepare_dagster_home()
    settings = load_settings(sources)
    with dg.DagsterInstance.get() as instance:
        pool_instance_connections(instance)  # as `sync` does
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.runcall(sync_source, settings, "bench", None, instance)
        seconds = time.perf_counter() - started
    profiler.dump_stats(str(out))
    return seconds


if __name__ == "__main__":
    main()
