"""Search quality (issue 24), on a throwaway embedded Postgres and Qdrant store:

  1. first sync of the same rows of the shared PyPI data with hybrid on and off (the real
     local model), rows per second of each `sync` process;
  2. known-item retrieval on those rows, per backend and mode (`sync.evaluation`): queries
     of two kinds, each with its row as the one relevant answer: the exact package name,
     and 3-5 distinctive words of its description (its rarest words among all summaries,
     none of them part of the name);
  3. search latency at `--latency-rows` rows (a free embedder: what the vectors mean does
     not change how long a search takes): p50 of dense and of hybrid, pgvector and the
     embedded Qdrant engine (which searches exactly: it builds no HNSW graph).

Prints figures; asserts nothing.

    .venv/bin/python benchmarks/search_quality.py [--rows 5000] [--queries 300]
        [--latency-rows 100000]
"""

import argparse
import gzip
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import sqlalchemy as sa
from throwaway import free_embedder_yaml, throwaway_home

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "pypi_packages_100k.tsv.gz"
CLI = [sys.executable, "-m", "embedding_assets.cli"]
WORD = re.compile(r"[a-z][a-z]{2,}")


def packages(limit: int) -> list[tuple[str, str]]:
    """(name, summary) of the first `limit` packages with a summary."""
    rows = []
    with gzip.open(DATA, "rt") as data:
        next(data)
        for line in data:
            name, _version, _month, summary = (line.rstrip("\n").split("\t") + [""] * 4)[:4]
            if summary.strip():
                rows.append((name, summary))
            if len(rows) == limit:
                break
    return rows


def load(engine, table: str, rows: list[tuple[str, str]]) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(f"CREATE TABLE {table} (name text PRIMARY KEY, summary text)"))
        conn.execute(
            sa.text(f"INSERT INTO {table} VALUES (:n, :s)"), [{"n": n, "s": s} for n, s in rows]
        )


def source_yaml(table: str, embedder: str, hybrid: bool) -> str:
    return (
        f"  - {{name: {table}, table: {table}, id_column: name, text: '{{name}}: {{summary}}',"
        f" embedder: {embedder}, shards: 4, max_rows_per_run: 200000,"
        f" hybrid: {'true' if hybrid else 'false'}}}\n"
    )


def timed_sync(sources: Path, table: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [*CLI, "--sources", str(sources), "sync", "--source", table], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise SystemExit(f"sync of {table} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - started


def known_items(rows: list[tuple[str, str]], count: int) -> tuple[list, list]:
    """`count` name queries and `count` description-word queries, from a seeded sample."""
    frequency = Counter(w for _, s in rows for w in set(WORD.findall(s.lower())))
    sample = random.Random(7).sample(rows, min(count * 2, len(rows)))
    names, words = [], []
    for name, summary in sample:
        in_name = set(WORD.findall(name.lower().replace("-", " ").replace("_", " ")))
        candidates = sorted(
            {w for w in WORD.findall(summary.lower()) if w not in in_name},
            key=lambda w: (frequency[w], w),
        )[:4]
        if len(names) < count:
            names.append((name, {name}))
        if len(candidates) >= 3 and len(words) < count:
            words.append((" ".join(candidates), {name}))
    return names, words


def quality(sources: Path, url: str, table: str, names: list, words: list) -> None:
    from embedding_assets.config.settings import load_settings
    from embedding_assets.sync.evaluation import backend_modes, evaluate_runtime
    from embedding_assets.sync.generations import runtime_for

    runtime = runtime_for(load_settings(sources), table, url, "live", register=False)
    pairs = backend_modes(runtime)
    for label, queries in (("name", names), ("description words", words)):
        print(f"[2] {len(queries)} {label} queries, k=10:")
        results = evaluate_runtime(runtime, queries, 10, pairs)
        for r in results:
            print(
                f"    {r['backend']:<9} {r['mode']:<8} recall@10 {r['recall_at_k']:.4f}  "
                f"MRR@10 {r['mrr_at_k']:.4f}  nDCG@10 {r['ndcg_at_k']:.4f}"
            )
        by = {(r["backend"], r["mode"]): r for r in results}
        for backend in ("pgvector", "qdrant"):
            hybrid, dense = by[(backend, "hybrid")], by[(backend, "dense")]
            lexical = by[(backend, "lexical")]
            print(
                f"    {backend} hybrid - dense: MRR@10 "
                f"{hybrid['mrr_at_k'] - dense['mrr_at_k']:+.4f}; hybrid recall@10 "
                f"{hybrid['recall_at_k']:.4f} vs max(dense, lexical) "
                f"{max(dense['recall_at_k'], lexical['recall_at_k']):.4f}"
            )


def latency(home: Path, url: str, engine, rows: int) -> None:
    """p50 of 100 searches, dense and hybrid, at `rows` rows (free embedder)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from free_embedder import FreeEmbedder, vectors_for

    from embedding_assets.config.settings import load_settings
    from embedding_assets.sync.generations import runtime_for

    load(engine, "pkg_big", packages(rows))
    free = FreeEmbedder().start()
    try:
        sources = home / "latency.yaml"
        sources.write_text(
            free_embedder_yaml(free.base_url) + "sources:\n" + source_yaml("pkg_big", "free", True)
        )
        seconds = timed_sync(sources, "pkg_big")
        print(f"[3] {rows} rows synced (free embedder) in {seconds:.0f} s")
        runtime = runtime_for(load_settings(sources), "pkg_big", url, "live", register=False)
        queries = [n for n, _ in random.Random(3).sample(packages(rows), 100)]
        with runtime.qdrant.store.keep_open():  # the embedded collection opened once
            for backend in ("pgvector", "qdrant"):
                search = getattr(runtime, backend).search
                for mode in ("dense", "hybrid", "dense", "hybrid"):  # the second is warm
                    took = []
                    for query in queries:
                        vector = vectors_for([query])[0]
                        started = time.perf_counter()
                        search(vector, 10, mode=mode, text=query)
                        took.append(time.perf_counter() - started)
                    print(f"    {backend} {mode}: p50 {1000 * statistics.median(took):.1f} ms")
    finally:
        free.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--latency-rows", type=int, default=100_000, help="0: no latency part")
    args = parser.parse_args()
    home = throwaway_home("ea-quality-")
    from embedding_assets.cli.common import ensure_database
    from embedding_assets.ops.embedded_postgres import EmbeddedPostgres
    from embedding_assets.state.db import engine_for

    url = ensure_database()
    engine = engine_for(url)
    try:
        rows = packages(args.rows)
        load(engine, "pkg_on", rows)
        load(engine, "pkg_off", rows)
        sources = home / "sources.yaml"
        sources.write_text(
            "embedders:\n  local: {provider: sentence_transformers}\nsources:\n"
            + source_yaml("pkg_on", "local", True)
            + source_yaml("pkg_off", "local", False)
        )
        on, off = timed_sync(sources, "pkg_on"), timed_sync(sources, "pkg_off")
        print(
            f"[1] first sync of {len(rows)} rows: hybrid on {len(rows) / on:.1f} rows/s "
            f"({on:.1f} s), off {len(rows) / off:.1f} rows/s ({off:.1f} s): {off / on:.2f}x"
        )
        names, words = known_items(rows, args.queries)
        quality(sources, url, "pkg_on", names, words)
        if args.latency_rows:
            latency(home, url, engine, args.latency_rows)
    finally:
        EmbeddedPostgres.from_env().stop()


if __name__ == "__main__":
    main()
