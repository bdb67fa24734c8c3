"""`embedding-assets live`: the live lane, a long-lived process (one per code location, like
`serve`) that writes each committed change of the trigger-captured sources to every sink
within about a second, and reports its writes to Dagster's instance."""

import logging
import os
import signal

import click

from embedding_assets.cli.common import ensure_database, settings_from, source_names
from embedding_assets.config.settings import Settings

# With the embedded Qdrant engine, how long a pass waits for a run to hand the collection
# over (runs do between shards) before it leaves the points for its next pass.
QDRANT_WAIT_SECONDS = 5.0


def live_sources(settings: Settings, names: list[str]) -> tuple[list, list[str]]:
    """The lane's sources (`LaneSource`), and a line per source it leaves to the sensor."""
    from embedding_assets.embedders.build import make_embedder
    from embedding_assets.ops.environment import database_url, qdrant_store_from_env
    from embedding_assets.state.capture import resolve_mode
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import GenerationError
    from embedding_assets.sync.generations import generation_runtime
    from embedding_assets.sync.live_lane import LaneSource

    url, store = database_url(), qdrant_store_from_env()
    if hasattr(store, "lock_timeout_s"):
        store.lock_timeout_s = QDRANT_WAIT_SECONDS
    embedders: dict[str, object] = {}
    served, left = [], []
    for name in names:
        spec = settings.source(name)
        if spec.live is False:
            left.append(f"{name}: live: false")
            continue
        embedder_spec = settings.embedder_for(spec)
        if spec.embedder not in embedders:
            embedders[spec.embedder] = make_embedder(embedder_spec)

        def runtime(spec=spec, embedder_spec=embedder_spec, embedder=embedders[spec.embedder]):
            # Read-only: registering an edited pipeline is the sensor's and `sync`'s.
            return generation_runtime(
                spec, embedder_spec, embedder, url, store, "live", register=False
            )

        try:
            feed = runtime().feed
            mode = feed.mode
        except GenerationError:  # never synced: its first sync installs the triggers
            feed, mode = None, resolve_mode(engine_for(url), spec)
        if mode != "trigger":
            left.append(f"{name}: {mode} capture has no triggers to notify the lane")
            continue
        if feed is not None:
            feed.ensure()  # triggers that notify (an older install is upgraded here)
        served.append(LaneSource(name, runtime))
    return served, left


@click.command()
@click.option("--source", default=None, help="Serve one source (default: every live source).")
@click.option("--debug-log", is_flag=True, help="Log every pass (shards, rows, seconds).")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=None,
    help="Serve Prometheus /metrics on this port (127.0.0.1): the lane's embedder calls and "
    "every source's figures.",
)
@click.pass_context
def live(ctx: click.Context, source: str | None, debug_log: bool, metrics_port: int | None) -> None:
    """The live lane: waits on Postgres LISTEN for the capture triggers and writes each
    committed change to pgvector, Qdrant and the write-back column within about a second,
    through the same ledger, claims and checks as a run, reported to Dagster as
    materializations. Idle, it only waits. Runs of the changes sensor take over while it is
    down. Stop it with Ctrl-C or SIGTERM."""
    import dagster as dg

    from embedding_assets.embedders.remote_requests import mark_live_requests
    from embedding_assets.ops.environment import prepare_dagster_home
    from embedding_assets.ops.instance_connections import pool_instance_connections
    from embedding_assets.ops.live_reports import LiveReporter
    from embedding_assets.state.lanes import LaneRegistry, lane_id
    from embedding_assets.sync.live_lane import LiveLane

    logging.basicConfig(format="%(asctime)s live: %(message)s", level=logging.WARNING)
    level = logging.DEBUG if debug_log else logging.INFO
    logging.getLogger("embedding_assets.live").setLevel(level)
    settings = settings_from(ctx)
    url = ensure_database()
    mark_live_requests()  # our worker serves this process's requests before bulk ones
    served, left = live_sources(settings, source_names(settings, source))
    for line in left:
        click.echo(f"not served by the live lane (the sensor keeps it): {line}", err=True)
    if not served:
        raise click.ClickException(
            "no source for the live lane: it serves `table:` sources whose changes capture "
            "triggers record (change_capture: trigger or auto) and that do not set live: false"
        )
    from sqlalchemy.engine import make_url

    from embedding_assets.state.db import engine_for

    names = [s.name for s in served]
    if metrics_port is not None:
        from prometheus_client import start_http_server

        from embedding_assets.ops.metrics import exposed_registry, serve_store_metrics

        serve_store_metrics(url)
        # A daemon thread.
        start_http_server(metrics_port, addr="127.0.0.1", registry=exposed_registry())
        click.echo(f"metrics on http://127.0.0.1:{metrics_port}/metrics", err=True)
    registry = LaneRegistry(engine_for(url), lane_id(os.getpid()), names)
    conninfo = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        pool_instance_connections(instance)  # not one connection per reported event
        reporter = LiveReporter(instance)
        lane = LiveLane(served, conninfo, registry, reporter, server=bool(os.getenv("QDRANT_URL")))
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: lane.stop.set())
        click.echo(f"live lane for {', '.join(names)} (Ctrl-C stops it)", err=True)
        try:
            lane.run()
        finally:
            reporter.close()
