"""What the write-back column costs, side by side in one run on a throwaway embedded Postgres
with the free embedder (benchmarks/free_embedder.py), so only the pipeline's own cost shows.
Prints figures; asserts nothing.

    .venv/bin/python benchmarks/write_back.py [--rows 50000] [--updates 1000]

Three sources, each over its own copy of the same rows and synced alone: chunk table +
Qdrant (the baseline), the same plus the write-back column, and a column-only source
(`pgvector: false`, `qdrant: false`). For each: the first sync, then `--updates` rows
changed and synced again.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

import sqlalchemy as sa
from scale import DATA, load_rows, timed
from throwaway import CLI, free_embedder_yaml, postgres_and_free_embedder, throwaway_home

VARIANTS = {
    "baseline": "",
    "with_column": "    write_back: {column: vec_with, index: hnsw}\n",
    "column_only": (
        "    write_back: {column: vec_only, index: hnsw}\n    pgvector: false\n    qdrant: false\n"
    ),
}


def write_sources(path: Path, base_url: str) -> None:
    sources = "".join(
        f"""  - name: {name}
    table: public.docs_{name}
    id_column: id
    text: "{{name}}: {{summary}}"
    metadata: [version]
    embedder: free
    shards: 8
{extra}"""
        for name, extra in VARIANTS.items()
    )
    path.write_text(
        free_embedder_yaml(base_url)
        + f"""sources:
{sources}"""
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--updates", type=int, default=1_000)
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    home = throwaway_home("ea-write-back-")
    with postgres_and_free_embedder() as (engine, embedder):
        load_rows(engine, args.rows, args.data)
        with engine.begin() as conn:
            for name in VARIANTS:  # one table each: no source's write touches another's
                conn.execute(sa.text(f"CREATE TABLE docs_{name} (LIKE bench_docs INCLUDING ALL)"))
                conn.execute(sa.text(f"INSERT INTO docs_{name} SELECT * FROM bench_docs"))
                conn.execute(sa.text(f"ANALYZE docs_{name}"))
        sources = home / "sources.yaml"
        write_sources(sources, embedder.base_url)
        env = {**os.environ, "EMBEDDING_ASSETS_SOURCES": str(sources)}
        first: dict[str, float] = {}
        for name in VARIANTS:
            seconds, out = timed([*CLI, "sync", "--source", name, "--json"], env)
            runs = json.loads(out.strip().splitlines()[-1])
            first[name] = seconds
            print(
                f"{name}: first sync {seconds:.1f} s ({sum(r['rows'] for r in runs)} rows, "
                f"{sum(r['embedded_chunks'] for r in runs)} chunks embedded)",
                flush=True,
            )
        with engine.begin() as conn:
            for name in VARIANTS:
                conn.execute(
                    sa.text(
                        f"UPDATE docs_{name} SET summary = summary || ' (updated)' WHERE id < :n"
                    ),
                    {"n": args.updates},
                )
        for name in VARIANTS:
            seconds, out = timed([*CLI, "sync", "--source", name, "--json"], env)
            runs = json.loads(out.strip().splitlines()[-1])
            print(
                f"{name}: {args.updates} updated rows synced in {seconds:.1f} s "
                f"({sum(r['rows'] for r in runs)} rows)",
                flush=True,
            )
        with engine.connect() as conn:
            for name, column in (("with_column", "vec_with"), ("column_only", "vec_only")):
                filled = conn.scalar(sa.text(f"SELECT count({column}) FROM docs_{name}"))
                print(f"rows with a vector in {column}: {filled} of {args.rows}")
        base = first["baseline"]
        print(
            "first sync relative to the baseline: "
            + ", ".join(f"{n} {s / base:.2f}x" for n, s in first.items())
        )
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
