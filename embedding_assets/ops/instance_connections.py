"""Pooled connections to the Dagster instance database.

dagster-postgres opens a new connection for every event it writes unless the instance is
"optimized for the webserver" (then it keeps a small pool). A shard run writes about 190
events; a `sync` of 4,000 rows in 8 shard runs opened 1,528 connections, 5.1 s of its
41.7 s (cProfile, benchmarks/throughput.py --profile). Run processes and `sync` pool them.
"""

import weakref

import dagster as dg

# Dagster's instance queries; the data database has its own limit (state.db).
STATEMENT_TIMEOUT_MS = 600_000
POOL_RECYCLE_SECONDS = 3600
MAX_OVERFLOW = 4

_POOLED: "weakref.WeakSet[dg.DagsterInstance]" = weakref.WeakSet()


def pool_instance_connections(instance: dg.DagsterInstance) -> None:
    """Keep the instance's storage connections open between events (once per instance)."""
    if instance in _POOLED:
        return
    instance.optimize_for_webserver(
        statement_timeout=STATEMENT_TIMEOUT_MS,
        pool_recycle=POOL_RECYCLE_SECONDS,
        max_overflow=MAX_OVERFLOW,
    )
    _POOLED.add(instance)
