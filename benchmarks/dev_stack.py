"""The dev stack from nothing to searchable (issue 9): `embedding-assets dev` on a throwaway
home loads the bundled demo (10,000 rows), starts the worker and Dagster, and its sensor
launches one run per shard. Measured: from dev's start and from the first run's start to
the moment every row is in pgvector and Qdrant (`status --json` polled every second, judged
by failures.py's `converged`), with per-stage seconds summed over the runs. Prints figures;
asserts nothing.

    .venv/bin/python benchmarks/dev_stack.py
"""

import time

from failures import cli, converged, status, wait_until
from throughput import step_breakdown
from throwaway import free_port, start_dev, stop_group, throwaway_home


def searchable_report() -> dict | None:
    """`status --json` once every row is in pgvector and Qdrant, else None."""
    report = status()
    return report if converged(report) else None


def main() -> None:
    # Its own worker port, as failures.py: a worker already on 8431 must not serve this.
    home = throwaway_home("ea-dev-stack-", EMBEDDING_ASSETS_WORKER_PORT=str(free_port()))
    import dagster as dg

    from embedding_assets.ops.environment import prepare_dagster_home

    began = time.time()
    dev = start_dev(home)
    try:
        up = wait_until(lambda: cli("status", "--json").returncode == 0, 300, 1)
        report = wait_until(searchable_report, 900, 1) if up else None
        done_at = time.time()
        if report is None:
            print("NOT searchable within 900 s:", status() if up else "dev did not come up")
            print((home / "dev.log").read_text()[-3000:])
            return
        dagster_home = prepare_dagster_home()
        with dg.DagsterInstance.get() as instance:
            records = instance.get_run_records()
            starts = [instance.get_run_stats(r.dagster_run.run_id).start_time for r in records]
            first = min(s for s in starts if s)
        job = records[0].dagster_run.job_name
        breakdown, per_run = step_breakdown(dagster_home, job, first, done_at)
        runs = int(breakdown.pop("runs", 0))
        print(f"rows: {report['embedded_rows']}, points: {report['qdrant_points']}, runs: {runs}")
        print(f"dev start -> first run start:       {first - began:6.1f} s")
        print(f"first run start -> all searchable:  {done_at - first:6.1f} s (target <= 40 s)")
        print(f"dev start -> all searchable:        {done_at - began:6.1f} s")
        print("seconds summed over the runs (they overlap: two run at once):")
        for kind, value in sorted(breakdown.items(), key=lambda kv: -kv[1]):
            if not kind.startswith(("before", "after", "between")):
                print(f"  {kind:40} {value:7.2f} s")
        print(f"  embeddings step per run, slowest first: {per_run}")
    finally:
        stop_group(dev, timeout=90)


if __name__ == "__main__":
    main()
