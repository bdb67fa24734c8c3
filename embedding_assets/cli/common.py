"""What every command shares: the settings from --sources, the sources named, the database (the
embedded server started when DATABASE_URL is unset), and a source's generation runtimes."""

import click

from embedding_assets.config.settings import Settings, SettingsError, load_settings


def embedded_server():
    from embedding_assets.ops.embedded_postgres import EmbeddedPostgres

    return EmbeddedPostgres.from_env()


def ensure_database() -> str:
    """The data database URL; starts the shared embedded server when DATABASE_URL is unset.
    A server started here keeps running: only `db stop` (or `dev`'s Ctrl-C) stops it."""
    from embedding_assets.ops.environment import database_url, uses_embedded_postgres

    if uses_embedded_postgres() and embedded_server().start():
        click.echo(f"started embedded Postgres on port {embedded_server().port}", err=True)
    return database_url()


def settings_from(ctx: click.Context) -> Settings:
    try:
        return load_settings(ctx.obj.get("sources"))
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from exc


def source_names(settings: Settings, name: str | None) -> list[str]:
    if name is None:
        return [s.name for s in settings.sources]
    try:
        return [settings.source(name).name]
    except KeyError as exc:
        raise click.ClickException(str(exc.args[0])) from exc


def generation_runtimes(settings: Settings, source: str, register: bool = True) -> list:
    """Runtimes of the source's live and (while one is built) building generation. Read-only
    commands pass `register=False`: an edited pipeline is not registered as a generation."""
    from embedding_assets.embedders.build import make_embedder
    from embedding_assets.ops.environment import database_url, qdrant_store_from_env
    from embedding_assets.sync.generations import all_runtimes

    spec = settings.source(source)
    embedder_spec = settings.embedder_for(spec)
    return all_runtimes(
        spec,
        embedder_spec,
        make_embedder(embedder_spec),
        database_url(),
        qdrant_store_from_env(),
        register=register,
    )
