"""`embedding-assets db`: the embedded PostgreSQL server (start, stop, status, url)."""

import json
import sys

import click

from embedding_assets.cli.common import embedded_server


@click.group()
def db() -> None:
    """The embedded PostgreSQL server (data under $EMBEDDING_ASSETS_HOME)."""


@db.command("start")
def db_start() -> None:
    """Start the shared server (no-op if it runs)."""
    server = embedded_server()
    started = server.start()
    click.echo(("started" if started else "already running") + f": {server.url()}")


@db.command("stop")
def db_stop() -> None:
    """Stop the shared server."""
    click.echo("stopped" if embedded_server().stop() else "not running")


@db.command("status")
@click.option("--json", "as_json", is_flag=True)
def db_status(as_json: bool) -> None:
    """Whether the server runs, its pid, port and folders."""
    status = embedded_server().status()
    if as_json:
        click.echo(json.dumps(status))
    else:
        for key, value in status.items():
            click.echo(f"{key}: {value}")
    sys.exit(0 if status["running"] else 1)


@db.command("url")
@click.option("--dagster", is_flag=True, help="The Dagster instance database instead.")
def db_url(dagster: bool) -> None:
    """A URL for SQLAlchemy and psql."""
    from embedding_assets.ops.embedded_postgres import DAGSTER_DATABASE, DATA_DATABASE

    click.echo(embedded_server().url(DAGSTER_DATABASE if dagster else DATA_DATABASE))


@db.command("demo")
def db_demo() -> None:
    """Load the bundled demo rows into public.pypi_packages, as `dev` does first (for `dg
    dev` or `dagster dev` alone); a table that has rows is left as it is."""
    from embedding_assets.cli.common import ensure_database
    from embedding_assets.ops.demo import DEMO_TABLE, load_demo
    from embedding_assets.state.db import engine_for

    rows = load_demo(engine_for(ensure_database()))
    click.echo(f"demo source {DEMO_TABLE}: {rows} rows")
