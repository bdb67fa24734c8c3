"""Search quality after one large row adds thousands of near-duplicate chunks (issue 8):
how many small rows pgvector's HNSW index finds first when queried with their own stored
vector, and recall@10 against exact search, at pgvector's default ef_search (40, no
iterative scan) and at the source's settings. Real local model, throwaway embedded
Postgres and Qdrant. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/search_recall.py [--sentences 9000] [--small 50]
"""

import argparse
import subprocess
import sys
import textwrap
import time

import numpy as np
import sqlalchemy as sa
from throwaway import throwaway_home


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sentences", type=int, default=9000)
    parser.add_argument("--small", type=int, default=50)
    args = parser.parse_args()
    home = throwaway_home("ea-recall-")

    from embedding_assets.cli.common import ensure_database
    from embedding_assets.config.destinations import PgvectorHnswSpec
    from embedding_assets.config.settings import load_settings
    from embedding_assets.destinations.recall import recall_at_k
    from embedding_assets.state.db import engine_for
    from embedding_assets.sync.generations import runtime_for

    sources = home / "sources.yaml"
    sources.write_text(
        textwrap.dedent(
            """\
            embedders:
              local: {provider: sentence_transformers}
            sources:
              - {name: notes, table: notes, text: "{body}", shards: 1,
                 chunking: {max_tokens: 16, overlap: 0}, max_rows_per_run: 100000}
            """
        )
    )
    url = ensure_database()
    big = " ".join(
        f"The parser version {i} reads the config file and logs a warning."
        for i in range(args.sentences)
    )
    rng = np.random.default_rng(7)
    words = [
        "alpha",
        "bravo",
        "cedar",
        "delta",
        "ember",
        "fjord",
        "garnet",
        "harbor",
        "iris",
        "juniper",
        "kelp",
        "lumen",
    ]
    small = [" ".join(rng.choice(words, 6)) + f" ticket {i}" for i in range(args.small)]
    with engine_for(url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE notes (id int PRIMARY KEY, body text)"))
        conn.execute(sa.text("INSERT INTO notes VALUES (0, :b)"), {"b": big})
        conn.execute(
            sa.text("INSERT INTO notes VALUES (:i, :b)"),
            [{"i": i + 1, "b": b} for i, b in enumerate(small)],
        )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "embedding_assets.cli", "--sources", str(sources), "sync"],
        capture_output=True,
        text=True,
    )
    print(f"sync: exit {done.returncode} in {time.perf_counter() - started:.1f} s")
    settings = load_settings(sources)
    runtime = runtime_for(settings, "notes", url)
    stored = runtime.pgvector.stored_chunks(0)
    print(f"chunks: {len(stored)}; index: {runtime.ledger.record().vector_index}")
    queries = stored[stored["row_id"] != "0"]
    hard = list(stored[stored["row_id"] == "0"]["embedding"][:: max(1, len(stored) // 100)])
    exact_hits = [[h.score for h in runtime.pgvector.search(v, 10, exact=True)] for v in hard]
    default = PgvectorHnswSpec(ef_search=40, iterative_scan="off")
    for label, hnsw in (("pgvector default (ef 40)", default), ("configured", None)):
        pg = runtime.pgvector
        if hnsw is not None:
            spec = settings.source("notes")
            pg.spec = replace_hnsw(spec, hnsw)
        found = sum(
            1
            for row in queries.itertuples(index=False)
            if (hits := pg.search(row.embedding, 10)) and hits[0].row_id == row.row_id
        )
        approx = [[h.score for h in pg.search(v, 10)] for v in hard]
        hnsw_now = pg.spec.pgvector.hnsw
        print(
            f"{label}: ef_search {hnsw_now.ef_search}, iterative_scan {hnsw_now.iterative_scan}: "
            f"small rows found first {found}/{len(queries)}, recall@10 on {len(hard)} "
            f"near-duplicate queries {recall_at_k(approx, exact_hits)}"
        )
        pg.spec = settings.source("notes")
    q_found = sum(
        1
        for row in queries.itertuples(index=False)
        if (hits := runtime.qdrant.search(row.embedding, 10, 0))
        and hits[0].payload["row_id"] == row.row_id
    )
    print(f"qdrant (embedded, exact): small rows found first {q_found}/{len(queries)}")
    subprocess.run([sys.executable, "-m", "embedding_assets.cli", "db", "stop"], check=False)


def replace_hnsw(spec, hnsw):
    return spec.model_copy(update={"pgvector": replace_pg(spec.pgvector, hnsw)})


def replace_pg(pgvector, hnsw):
    return pgvector.model_copy(update={"hnsw": hnsw})


if __name__ == "__main__":
    main()
