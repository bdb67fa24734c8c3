"""Freshness with default settings (issue 11): on a running `embedding-assets dev` (the
bundled demo, the worker, Dagster's daemon and sensors), one row is inserted at a time, and
the time from its commit until it is in both sinks is measured: in the pgvector view and,
by the ledger, in Qdrant (`qdrant_hash` equal to the stored content hash). The stack is
first left to finish embedding the demo. Prints the median and p90; asserts nothing.

    .venv/bin/python benchmarks/freshness.py [--inserts 10]
"""

import argparse
import statistics
import time

from failures import converged, status, wait_until
from throwaway import free_port, start_dev, stop_group, throwaway_home


def searchable(engine, name: str) -> bool:
    import sqlalchemy as sa

    with engine.connect() as conn:
        return bool(
            conn.scalar(
                sa.text(
                    """SELECT EXISTS (SELECT 1 FROM public.pypi_packages_embeddings
                        WHERE row_id = :r)
                    AND EXISTS (SELECT 1 FROM embedding_assets.row_state
                        WHERE row_id = :r AND qdrant_hash = content_hash)"""
                ),
                {"r": name},
            )
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inserts", type=int, default=10)
    args = parser.parse_args()
    home = throwaway_home("ea-freshness-", EMBEDDING_ASSETS_WORKER_PORT=str(free_port()))
    import sqlalchemy as sa

    dev = start_dev(home)
    try:
        if not wait_until(lambda: converged(status()), 900, every=5):
            raise SystemExit(f"the demo did not finish embedding; see {home / 'dev.log'}")
        from embedding_assets.ops.environment import database_url
        from embedding_assets.state.db import engine_for

        engine = engine_for(database_url())
        seconds = []
        for i in range(args.inserts):
            name = f"freshness-probe-{i}"
            with engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "INSERT INTO public.pypi_packages (name, version, month, summary) "
                        "VALUES (:n, '1.0', '2026-12', 'a freshly published package')"
                    ),
                    {"n": name},
                )
            committed = time.perf_counter()
            while not searchable(engine, name):
                if time.perf_counter() - committed > 180:
                    raise SystemExit(f"insert {i} not searchable within 180 s")
                time.sleep(0.1)
            seconds.append(time.perf_counter() - committed)
            print(f"  insert {i}: {seconds[-1]:.1f} s", flush=True)
            time.sleep(2)  # apart, as single edits arrive
        ordered = sorted(seconds)
        p90 = ordered[max(0, int(round(0.9 * len(ordered))) - 1)]
        print(
            f"one inserted row, commit to searchable in both sinks: median "
            f"{statistics.median(seconds):.1f} s, p90 {p90:.1f} s, max {ordered[-1]:.1f} s "
            f"({len(seconds)} inserts)"
        )
    finally:
        stop_group(dev)


if __name__ == "__main__":
    main()
