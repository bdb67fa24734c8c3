"""Full sync of the bundled demo (10,000 rows) in one process, then a no-op re-sync and a
1% update, on a throwaway embedded Postgres and Qdrant store. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/sync_demo.py [--rows N]
"""

import argparse
import shutil
import time

from throwaway import throwaway_home


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=None, help="load only the first N demo rows")
    args = parser.parse_args()

    home = throwaway_home("ea-bench-")

    import dagster as dg
    import sqlalchemy as sa

    from embedding_assets.cli.sync import sync_source
    from embedding_assets.config.settings import load_settings
    from embedding_assets.ops.demo import load_demo
    from embedding_assets.ops.embedded_postgres import EmbeddedPostgres
    from embedding_assets.state.db import engine_for

    server = EmbeddedPostgres.from_env()
    server.start()
    try:
        engine = engine_for(server.url())
        rows = load_demo(engine, limit=args.rows)
        settings = load_settings()
        source = settings.sources[0].name

        def timed_sync(label: str) -> None:
            with dg.DagsterInstance.ephemeral() as instance:
                started = time.perf_counter()
                reports = sync_source(settings, source, None, instance)
                seconds = time.perf_counter() - started
            done = sum(r.rows for r in reports)
            embedded = sum(r.embedded_chunks for r in reports)
            reused = sum(r.reused_chunks for r in reports)
            print(
                f"{label:<14} {seconds:7.1f} s  rows {done:6d}  embedded chunks {embedded:6d}  "
                f"reused {reused:6d}  {done / seconds:7.1f} rows/s  "
                f"ok={all(r.success for r in reports)}"
            )

        print(
            f"demo rows: {rows}, shards: {settings.sources[0].shards}, "
            "one process, in-process executor"
        )
        timed_sync("full sync")
        timed_sync("no-op re-sync")
        with engine.begin() as conn:
            changed = conn.execute(
                sa.text(
                    "UPDATE public.pypi_packages SET summary = summary || ' (updated)' "
                    "WHERE md5(name) < '03'"
                )
            ).rowcount
        print(f"updated {changed} rows")
        timed_sync("1% update")
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
