"""`embedding-assets prune`: remove what a source no longer in sources.yaml left behind."""

import click

from embedding_assets.cli.common import ensure_database, settings_from


@click.command()
@click.option("--source", required=True, help="The name of a source no longer configured.")
@click.pass_context
def prune(ctx: click.Context, source: str) -> None:
    """Drop the capture triggers, queued changes and staged outputs of a source that is no
    longer in sources.yaml (a rename, a removal). Stored vectors stay."""
    from embedding_assets.ops.environment import database_url
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.leftovers import prune as prune_source

    settings = settings_from(ctx)
    if source in {s.name for s in settings.sources}:
        raise click.ClickException(
            f"source {source!r} is in sources.yaml; prune removes only what an unconfigured "
            "source left. Remove it from sources.yaml first"
        )
    ensure_database()
    removed = prune_source(engine_for(database_url()), source)
    if not removed.any:
        click.echo(f"nothing left by source {source!r}")
        return
    click.echo(
        f"removed {len(removed.triggers)} capture triggers, {removed.queued} queued changes "
        f"and {removed.staged} staged outputs of source {source!r}"
    )
