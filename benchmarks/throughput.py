"""End-to-end throughput against the one-liner a user would otherwise write (issue 9): a bare
`SentenceTransformer.encode(texts, batch_size=32)` of the same texts, then
`embedding-assets sync` of a fresh table holding them (a subprocess: process start,
Dagster, every shard run), side by side in one run, on a throwaway embedded Postgres and
Qdrant store. Rows are package descriptions from ../shared/data (the last N rows of the
file, which the tests never use), composed as `{name}: {description}`. Prints figures and,
per stage, where the seconds of the runs went (Dagster's step timings); asserts nothing.

    .venv/bin/python benchmarks/throughput.py [--rows 4000] [--shards 8]
        [--paths local,worker,bf16] [--profile FILE]

Paths: `local` syncs with the in-process model (fp32, exact); `worker` through a warm
`embedding-assets serve` (fp32, OpenAI-compatible provider); `bf16` in-process in bfloat16,
against a bare encode in bfloat16. Each path gets its own table and a bare call right before.
"""

import argparse
import gzip
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from pathlib import Path

from throwaway import free_port, stop_group, throwaway_home

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "pypi_packages_100k.tsv.gz"
CLI = [sys.executable, "-m", "embedding_assets.cli"]


def unseen_rows(count: int) -> list[tuple[str, str]]:
    lines = gzip.decompress(DATA.read_bytes()).decode().split("\n")[1:]
    records = [line.split("\t") for line in lines if line.count("\t") == 3]
    return [(name, summary) for name, _, _, summary in records[-count:]]


def bare_encode(texts: list[str], precision: str = "float32") -> float:
    """texts/s of SentenceTransformer.encode(batch_size=32), model loaded beforehand."""
    from embedding_assets.embedders.sentence_transformers import SentenceTransformerEmbedder

    model = SentenceTransformerEmbedder(precision=precision).load()
    model.encode(texts[:64], batch_size=32)  # warm-up
    started = time.perf_counter()
    model.encode(texts, batch_size=32)
    return len(texts) / (time.perf_counter() - started)


def step_breakdown(
    dagster_home: Path, job: str, began: float, ended: float
) -> tuple[dict[str, float], list[float]]:
    """Seconds per step kind over the runs of `job`, plus run overhead, and the
    seconds of the sync before its first run and after its last (epoch `began`/`ended`);
    and the embeddings step's seconds per run."""
    import dagster as dg

    totals: dict[str, float] = defaultdict(float)
    first, last = ended, began
    per_run: list[float] = []
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for record in instance.get_run_records(dg.RunsFilter(job_name=job)):
            run = record.dagster_run
            stats = instance.get_run_stats(run.run_id)
            first, last = min(first, stats.start_time or ended), max(last, stats.end_time or 0)
            run_seconds = (stats.end_time or 0) - (stats.start_time or 0)
            steps = 0.0
            for step in instance.get_run_step_stats(run.run_id):
                seconds = (step.end_time or 0) - (step.start_time or 0)
                kind = step.step_key.split("__", 1)[-1]
                kind = "checks" if kind.startswith(("embeddings_", "vector_index_")) else kind
                totals[kind] += seconds
                steps += seconds
                if kind == "embeddings":
                    per_run.append(round(seconds, 2))
            totals["run start/stop (outside steps)"] += max(0.0, run_seconds - steps)
            totals["runs"] += 1
    in_runs = sum(v for k, v in totals.items() if k != "runs")
    totals["before the first run (start-up, audit)"] = max(0.0, first - began)
    totals["after the last run (exit)"] = max(0.0, ended - last)
    totals["between runs"] = max(0.0, (last - first) - in_runs)
    return dict(totals), sorted(per_run, reverse=True)


PATHS = {
    # name: (embedder line of sources.yaml, worker precision or None)
    "local": ("{provider: sentence_transformers}", None),
    "worker": (
        "{provider: openai, model: all-MiniLM-L6-v2, base_urls: ['%s'], encoding_format: base64}",
        "float32",
    ),
    "bf16": ("{provider: sentence_transformers, precision: bfloat16}", None),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument(
        "--paths",
        default="local,worker,bf16",
        help="comma-separated: local (in-process fp32), worker (a warm `serve`), bf16",
    )
    parser.add_argument(
        "--profile", type=Path, help="run the local sync under cProfile, stats written here"
    )
    args = parser.parse_args()
    home = throwaway_home("ea-throughput-")

    import sqlalchemy as sa

    from embedding_assets.cli.common import ensure_database
    from embedding_assets.ops.environment import prepare_dagster_home
    from embedding_assets.state.db import engine_for

    rows = unseen_rows(args.rows)
    texts = [f"{name}: {summary}" for name, summary in rows]
    url = ensure_database()
    paths = [p for p in args.paths.split(",") if p]
    worker_port = free_port()
    worker = start_worker(worker_port) if "worker" in paths else None
    print(f"rows: {len(rows)}, shards: {args.shards}")
    try:
        for path in paths:
            table = f"bench_{path}"
            with engine_for(url).begin() as conn:
                conn.execute(
                    sa.text(
                        f"CREATE TABLE {table} (id int PRIMARY KEY, name text, description text)"
                    )
                )
                conn.execute(
                    sa.text(f"INSERT INTO {table} VALUES (:i, :n, :d)"),
                    [{"i": i, "n": n, "d": d} for i, (n, d) in enumerate(rows)],
                )
            embedder = PATHS[path][0]
            if "%s" in embedder:
                embedder = embedder % f"http://127.0.0.1:{worker_port}/v1"
            sources = home / f"sources_{path}.yaml"
            sources.write_text(
                textwrap.dedent(
                    f"""\
                    embedders:
                      e: {embedder}
                    sources:
                      - {{name: {table}, table: {table}, text: "{{name}}: {{description}}",
                         embedder: e, shards: {args.shards}}}
                    """
                )
            )
            # The bare call right before each sync: the machine is shared and its speed drifts.
            bare = bare_encode(texts, "bfloat16" if path == "bf16" else "float32")
            began, started = time.time(), time.perf_counter()
            if args.profile and path == "local":
                seconds = profiled_sync(sources, table, args.profile)
            else:
                done = subprocess.run(
                    [*CLI, "--sources", str(sources), "sync"], capture_output=True, text=True
                )
                seconds = time.perf_counter() - started
                if done.returncode != 0:
                    print(done.stderr[-3000:])
            synced = len(rows) / seconds
            print(f"\n[{path}] bare encode(batch_size=32): {bare:7.1f} texts/s")
            print(
                f"[{path}] sync: {synced:7.1f} rows/s = {synced / bare:.2f}x the bare call "
                f"({seconds:.1f} s)"
            )
            breakdown, per_run = step_breakdown(
                prepare_dagster_home(), f"{table}_sync_shards", began, began + seconds
            )
            runs = int(breakdown.pop("runs", 0))
            print(f"[{path}] where the {runs} runs' seconds went (summed over runs):")
            for kind, value in sorted(breakdown.items(), key=lambda kv: -kv[1]):
                print(f"  {kind:40} {value:7.2f} s")
            print(f"  embeddings step per run, slowest first: {per_run}")
    finally:
        if worker is not None:
            stop_group(worker)
        subprocess.run([*CLI, "db", "stop"], check=False, capture_output=True)
    if args.profile:
        import pstats

        print(f"profile of the in-process sync ({args.profile}):")
        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(r"embedding_assets", 40)


def start_worker(port: int) -> subprocess.Popen:
    """A warm `embedding-assets serve` (model loaded, one request answered)."""
    import json
    import urllib.request

    worker = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/embeddings",
        data=json.dumps({"model": "all-MiniLM-L6-v2", "input": ["warm up"] * 64}).encode(),
        headers={"Content-Type": "application/json"},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=60):
                return worker
        except OSError:
            time.sleep(0.5)
    stop_group(worker)
    raise SystemExit("the worker did not answer within 180 s")


def profiled_sync(sources: Path, source: str, out: Path) -> float:
    """The sync in this process (the model already loaded), under cProfile: Dagster's
    in-process executor runs every step in this thread, so the profile sees them all."""
    import cProfile

    import dagster as dg

    from embedding_assets.cli.sync import sync_source
    from embedding_assets.config.settings import load_settings
    from embedding_assets.ops.environment import prepare_dagster_home
    from embedding_assets.ops.instance_connections import pool_instance_connections

    prepare_dagster_home()
    settings = load_settings(sources)
    with dg.DagsterInstance.get() as instance:
        pool_instance_connections(instance)  # as `sync` does
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.runcall(sync_source, settings, source, None, instance)
        seconds = time.perf_counter() - started
    profiler.dump_stats(str(out))
    return seconds


if __name__ == "__main__":
    main()
