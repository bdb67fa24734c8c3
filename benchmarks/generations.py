"""A model change on a large source, end to end, on a throwaway embedded Postgres and the
embedded Qdrant engine, with a free embedder (benchmarks/free_embedder.py) serving two
"models" so only the pipeline's own cost shows. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/generations.py [--rows 100000]

Steps: the first `sync` (generation 1, model-a); `plan` for model-b; `sync` building
generation 2 beside it and promoting it; the promotion checks alone; then the view switch
alone, with a reader querying the stable view in a loop (its slowest query is what a reader
waits at a switch).
"""

import argparse
import json
import os
import shutil
import statistics
import threading
import time
from pathlib import Path

from scale import DATA, load_rows, timed
from throwaway import CLI, free_embedder_yaml, postgres_and_free_embedder, throwaway_home


def write_sources(path: Path, base_url: str, model: str) -> None:
    path.write_text(
        free_embedder_yaml(base_url, model, "    price_per_million_tokens: 0.02\n")
        + """sources:
  - name: bench
    table: public.bench_docs
    id_column: id
    text: "{name}: {summary}"
    metadata: [version]
    embedder: free
    shards: 8
"""
    )


def reader_latencies(url: str, stop: threading.Event, found: list[float]) -> None:
    import sqlalchemy as sa

    from embedding_assets.state.db import engine_for

    engine = engine_for(url)
    query = sa.text(
        "SELECT row_id FROM public.bench_embeddings ORDER BY embedding <=> "
        "(SELECT embedding FROM public.bench_embeddings LIMIT 1) LIMIT 5"
    )
    with engine.connect() as conn:
        while not stop.is_set():
            started = time.perf_counter()
            conn.execute(query).fetchall()
            conn.rollback()
            found.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()

    home = throwaway_home("ea-generations-")

    from embedding_assets.config.settings import load_settings
    from embedding_assets.destinations.pg_relations import publish_view
    from embedding_assets.sync.generations import runtime_for
    from embedding_assets.sync.promotion import promotion_blockers

    with postgres_and_free_embedder() as (engine, embedder):
        url = os.environ["DATABASE_URL"]
        load_rows(engine, args.rows, args.data)
        sources = home / "sources.yaml"
        os.environ["EMBEDDING_ASSETS_SOURCES"] = str(sources)
        env = dict(os.environ)

        write_sources(sources, embedder.base_url, "model-a")
        seconds, out = timed([*CLI, "sync", "--json"], env)
        runs = json.loads(out.strip().splitlines()[-1])
        print(f"generation 1, first sync: {seconds:.1f} s, {sum(r['rows'] for r in runs)} rows")

        write_sources(sources, embedder.base_url, "model-b")
        seconds, out = timed([*CLI, "plan", "--json"], env)
        plan = json.loads(out.strip().splitlines()[-1])[0]
        print(
            f"plan for model-b: {seconds:.1f} s as a command; {plan['rows']} rows, "
            f"{plan['chunks_to_embed']} chunks and {plan['tokens_to_embed']:,} tokens to embed, "
            f"{plan['chunks_reused']} reused, ${plan['estimated_cost']:.4f}"
        )
        seconds, out = timed([*CLI, "sync", "--json"], env)
        runs = json.loads(out.strip().splitlines()[-1])
        built = [r for r in runs if r["generation"] == 2]
        promoted = [r for r in built if r.get("promoted_generation")]
        print(
            f"generation 2, built beside 1 and promoted: {seconds:.1f} s; "
            f"{sum(r['embedded_chunks'] for r in built)} chunks embedded (plan said "
            f"{plan['chunks_to_embed']}); promoted by the run of shard "
            f"{promoted[0]['shard'] if promoted else '-'}, which took "
            f"{promoted[0]['seconds'] if promoted else '-'} s (of them "
            f"{promoted[0]['index_build_seconds'] if promoted else '-'} s the pgvector HNSW "
            "build after the bulk load)"
        )

        settings = load_settings(sources)
        live = runtime_for(settings, "bench", url, "live")
        timings = []
        for _ in range(3):
            started = time.perf_counter()
            blockers = promotion_blockers(live)
            timings.append(time.perf_counter() - started)
        print(
            f"promotion checks over the whole generation ({live.pgvector.chunk_count(0) * 8:,}"
            f" chunks approx.): median {statistics.median(timings):.2f} s of 3; blockers: "
            f"{blockers or 'none'}"
        )

        latencies: list[float] = []
        stop = threading.Event()
        reader = threading.Thread(target=reader_latencies, args=(url, stop, latencies))
        reader.start()
        time.sleep(2)
        before = len(latencies)
        switches = []
        for table in ("bench_embeddings__g1", "bench_embeddings__g2") * 5:
            started = time.perf_counter()
            with engine.begin() as conn:
                publish_view(conn, ("public", "bench_embeddings"), ("public", table))
            switches.append(time.perf_counter() - started)
            time.sleep(0.5)
        stop.set()
        reader.join()
        steady = sorted(latencies[:before])
        print(
            f"view switch (one transaction): median {statistics.median(switches) * 1000:.1f} ms "
            f"of 10; a reader's query on the view: median "
            f"{statistics.median(steady) * 1000:.1f} ms before, slowest during the switches "
            f"{max(latencies[before:]) * 1000:.1f} ms ({len(latencies)} queries)"
        )
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
