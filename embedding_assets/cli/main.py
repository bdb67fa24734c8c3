"""`embedding-assets`: the command group, its error handling (one line naming the problem and the
fix, the traceback with --debug), the commands of the modules beside this one, and the console
script."""

import os
import sys
from pathlib import Path

import click

from embedding_assets.cli.db import db
from embedding_assets.cli.dev import dev
from embedding_assets.cli.doctor import doctor
from embedding_assets.cli.errors import errors
from embedding_assets.cli.evaluate import evaluate
from embedding_assets.cli.generations import generations
from embedding_assets.cli.live import live
from embedding_assets.cli.plan import plan
from embedding_assets.cli.prune import prune
from embedding_assets.cli.reconcile import reconcile
from embedding_assets.cli.search import search
from embedding_assets.cli.serve import serve
from embedding_assets.cli.status import status
from embedding_assets.cli.sync import sync
from embedding_assets.cli.triggers import triggers
from embedding_assets.state.privileges import INSUFFICIENT_PRIVILEGE, privilege_fix

# Hints for database errors, by SQLSTATE class or code.
SQLSTATE_HINTS = {
    "42703": "a column named in sources.yaml (`text`, `metadata`, `id_column`, `where`, "
    "`watermark_column`) does not exist: fix the name, or alias it in a `query:`",
    "42P01": "a table does not exist: check `table:` / `query:` in sources.yaml and the "
    "database DATABASE_URL points at",
    "42501": "the database role lacks a privilege: grant it, or use another DATABASE_URL",
    "28": "the database refused the login: check the user and password in DATABASE_URL",
    "3D000": "the database does not exist: create it or fix DATABASE_URL",
}


def _role_of(exc: Exception) -> str:
    """The role the failed connection logged in as (DATABASE_URL's user)."""
    from sqlalchemy.engine import make_url

    from embedding_assets.ops.environment import database_url

    try:
        return make_url(database_url()).username or "current_user"
    except Exception:
        return "current_user"


def database_error_message(exc: Exception) -> str:
    """One line naming the cause and the fix, for a SQLAlchemy/driver error."""
    orig = getattr(exc, "orig", None) or exc
    # psycopg 3 names it sqlstate, psycopg2 pgcode.
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None) or ""
    first = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
    if sqlstate == INSUFFICIENT_PRIVILEGE:
        fix = privilege_fix(first, _role_of(exc))
        if fix is not None:
            return f"database error: {first}. As a DBA, run: {fix}"
    hint = SQLSTATE_HINTS.get(sqlstate) or SQLSTATE_HINTS.get(sqlstate[:2])
    if hint is None and not sqlstate:
        hint = (
            "is the database running and reachable? Check DATABASE_URL "
            "(unset, the embedded server is used: `embedding-assets db start`)"
        )
    return f"database error: {first}" + (f" ({hint})" if hint else "")


class _Commands(click.Group):
    """Errors reach the user as one line naming the problem and the fix, not a traceback
    (`--debug` shows the traceback)."""

    def invoke(self, ctx: click.Context):
        import sqlalchemy.exc

        from embedding_assets.state.diff import SourceColumnsError
        from embedding_assets.state.ledger import ModelMismatchError
        from embedding_assets.state.privileges import PrivilegeError
        from embedding_assets.state.triggers import TriggerPrivilegeError

        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if (ctx.obj or {}).get("debug"):
                raise
            if isinstance(exc, sqlalchemy.exc.DBAPIError):
                message = database_error_message(exc)
            elif isinstance(
                exc,
                (
                    LookupError,
                    SourceColumnsError,
                    ModelMismatchError,
                    TriggerPrivilegeError,
                    PrivilegeError,
                ),
            ):
                message = str(exc.args[0] if exc.args else exc)
            else:
                message = f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
            raise click.ClickException(message) from exc


@click.group(cls=_Commands)
@click.option(
    "--sources",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="EMBEDDING_ASSETS_SOURCES",
    help="sources.yaml (default: $EMBEDDING_ASSETS_SOURCES, else the bundled demo).",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
@click.pass_context
def main(ctx: click.Context, sources: Path | None, debug: bool) -> None:
    """Keep embeddings of PostgreSQL rows in sync in pgvector and Qdrant, with Dagster."""
    ctx.ensure_object(dict)
    ctx.obj["sources"] = sources
    ctx.obj["debug"] = debug


for command in (
    db,
    dev,
    doctor,
    errors,
    evaluate,
    generations,
    live,
    plan,
    prune,
    reconcile,
    search,
    serve,
    status,
    sync,
    triggers,
):
    main.add_command(command)


def entry() -> None:
    """The console script: `main`, then out without the interpreter's teardown. Everything
    durable is committed or closed by then; tearing down torch, the embedded Qdrant engine
    and thousands of modules took 1.4-2.2 s of native code after every sync here."""
    import logging

    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
