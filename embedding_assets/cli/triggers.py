"""`embedding-assets triggers`: the capture triggers of `table:` sources: the SQL for a DBA,
install, drop."""

import click
import sqlalchemy as sa

from embedding_assets.cli.common import ensure_database, settings_from, source_names


@click.group()
def triggers() -> None:
    """The capture triggers of `table:` sources (change_capture: trigger)."""


def _trigger_feed(ctx: click.Context, source: str):
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.trigger_feed import TriggerFeed
    from embedding_assets.sync.generations import runtime_for

    settings = settings_from(ctx)
    name = source_names(settings, source)[0]
    if settings.source(name).table is None:
        raise click.ClickException(f"source {name!r} is a `query:` source: no triggers")
    runtime = runtime_for(settings, name, database_url())
    return TriggerFeed(
        runtime.engine, runtime.spec, runtime.diff, runtime.feed.queue, runtime.feed.watched_extra
    )


@triggers.command("sql")
@click.option("--source", required=True)
@click.pass_context
def triggers_sql(ctx: click.Context, source: str) -> None:
    """Print the SQL that installs the triggers, for a DBA to run: our schema owned by this
    tool's role (DATABASE_URL's), the triggers, and the function owned by the role and
    callable by nobody else. Reads only: works for a role that may create nothing."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.generations import kept_template_columns
    from embedding_assets.state.triggers import CaptureTriggers, table_columns

    ensure_database()
    settings = settings_from(ctx)
    spec = settings.source(source_names(settings, source)[0])
    if spec.table is None:
        raise click.ClickException(f"source {spec.name!r} is a `query:` source: no triggers")
    with engine_for(database_url()).connect() as conn:
        columns = table_columns(conn, spec)
        if not columns:
            raise click.ClickException(f"table {spec.table} does not exist (or is not visible)")
        role = conn.scalar(sa.text("SELECT current_user"))
        extra = kept_template_columns(conn, spec.name)
        click.echo(CaptureTriggers(spec, columns, extra).dba_sql(role))


@triggers.command("install")
@click.option("--source", required=True)
@click.pass_context
def triggers_install(ctx: click.Context, source: str) -> None:
    """Install (or replace) the triggers and queue what a full diff finds pending."""
    ensure_database()
    feed = _trigger_feed(ctx, source)
    # A TriggerPrivilegeError reaches the user as its message through _Commands.
    with feed.engine.begin() as conn:
        found = feed.install(conn, feed.triggers(conn))
    click.echo(f"installed capture triggers for {source}; {found} rows queued")


@triggers.command("drop")
@click.option("--source", required=True)
@click.pass_context
def triggers_drop(ctx: click.Context, source: str) -> None:
    """Drop the triggers (set change_capture to watermark or diff, or they come back)."""
    ensure_database()
    _trigger_feed(ctx, source).drop()
    click.echo(f"dropped capture triggers of {source}")
