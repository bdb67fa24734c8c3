"""`embedding-assets doctor`: the configured database role checked against what each source
needs, with the exact SQL for what is missing, before anything is embedded."""

import json

import click
import sqlalchemy as sa

from embedding_assets.cli.common import settings_from, source_names


def doctor_report(settings, name: str) -> dict:
    from embedding_assets.ops.environment import database_url, instance_storage_shared
    from embedding_assets.state.db import engine_for
    from embedding_assets.state.privileges import (
        describe_row_security,
        instance_storage_missing,
        missing_privileges,
        row_security,
    )
    from embedding_assets.state.triggers import CaptureTriggers, function_warnings, table_columns

    spec = settings.source(name)
    engine = engine_for(database_url())
    missing = missing_privileges(engine, spec)
    if instance_storage_shared():
        missing += instance_storage_missing(engine)
    warnings = []
    with engine.connect() as conn:
        role = conn.scalar(sa.text("SELECT current_user"))
        if spec.table is not None:
            warnings += function_warnings(conn, CaptureTriggers(spec, table_columns(conn, spec)))
        warnings += [describe_row_security(e, spec) for e in row_security(conn, spec)]
    return {
        "source": name,
        "role": role,
        "missing": [{"object": m.object, "privilege": m.privilege, "fix": m.fix} for m in missing],
        "warnings": warnings,
    }


@click.command()
@click.option("--source", help="Only this source (default: all).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def doctor(ctx: click.Context, source: str | None, as_json: bool) -> None:
    """Check the database role (DATABASE_URL's) against what each source needs: SELECT on
    the source, our schema and the pgvector table's, triggers, the write-back columns.
    Prints the GRANT / ALTER statements a DBA runs for what is missing; exits 1 if any.
    Reads only."""
    from embedding_assets.cli.common import ensure_database

    ensure_database()
    settings = settings_from(ctx)
    reports = [doctor_report(settings, name) for name in source_names(settings, source)]
    if as_json:
        click.echo(json.dumps(reports))
    else:
        for report in reports:
            state = "ok" if not report["missing"] else f"{len(report['missing'])} missing"
            click.echo(f"{report['source']} (role {report['role']}): {state}")
            for missing in report["missing"]:
                click.echo(f"  MISSING {missing['privilege']} on {missing['object']}")
                click.echo(f"    {missing['fix']}")
            for warning in report["warnings"]:
                click.echo(f"  WARNING {warning}")
    if any(r["missing"] for r in reports):
        raise SystemExit(1)
