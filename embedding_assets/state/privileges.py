"""What the tool's database role needs, checked before anything is embedded, and the exact SQL
a DBA runs for what is missing.

The minimal grant sets (README, "Running as a least-privileged role"):

- always: SELECT on the source (every table a `query:` reads); our schema
  `embedding_assets` created by the role, or by a DBA with `AUTHORIZATION <role>`; the
  pgvector table's schema likewise (or USAGE, CREATE on it). CREATE on the database is
  needed only while one of those schemas does not exist.
- trigger capture: TRIGGER on the source table, or the triggers installed by a DBA from
  `embedding-assets triggers sql` (then nothing more).
- write-back into the source: UPDATE on the write-back columns, which the table's owner
  adds (the `write_back` SQL the tool prints); into a side table: CREATE on its schema.

Nothing here writes: every check reads the catalog or runs a rolled-back `LIMIT 0` query.
"""

import re
from dataclasses import dataclass

import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.config.sources import SourceSpec
from embedding_assets.state.ddl import STATE_SCHEMA, schema_exists
from embedding_assets.state.source_sql import quote_ident, quote_table

INSUFFICIENT_PRIVILEGE = "42501"


@dataclass(frozen=True)
class Missing:
    """One privilege the role lacks: on what, which, and the SQL that grants it."""

    object: str
    privilege: str
    fix: str

    def line(self) -> str:
        return f"{self.privilege} on {self.object} is missing: {self.fix}"


def _role(conn: sa.Connection) -> str:
    return conn.scalar(sa.text("SELECT current_user"))


def _schema_needs(
    conn: sa.Connection, schema: str, role: str, why: str, create: bool = True
) -> list[Missing]:
    """A schema the role uses (USAGE) and creates objects in (CREATE, unless `create` is
    False): it exists with those, or the role may create it (CREATE on the database)."""
    if not schema_exists(conn, schema):
        if conn.scalar(sa.text("SELECT has_database_privilege(current_database(), 'CREATE')")):
            return []
        return [
            Missing(
                f"schema {schema} ({why})",
                "the schema (it does not exist, and the role may not create it)",
                f"CREATE SCHEMA {quote_ident(schema)} AUTHORIZATION {quote_ident(role)};",
            )
        ]
    wanted = ("USAGE", "CREATE") if create else ("USAGE",)
    lacking = [
        p
        for p in wanted
        if not conn.scalar(sa.text("SELECT has_schema_privilege(:s, :p)"), {"s": schema, "p": p})
    ]
    if not lacking:
        return []
    return [
        Missing(
            f"schema {schema} ({why})",
            " and ".join(lacking),
            f"GRANT {', '.join(wanted)} ON SCHEMA {quote_ident(schema)} TO {quote_ident(role)};",
        )
    ]


def _state_schema(conn: sa.Connection, role: str) -> list[Missing]:
    """Our schema: CREATE in it only while a migration is still to be applied."""
    from embedding_assets.state.migrations import LATEST, schema_version

    exists = schema_exists(conn, STATE_SCHEMA)
    current = (
        exists
        and conn.scalar(sa.text("SELECT has_schema_privilege(:s, 'USAGE')"), {"s": STATE_SCHEMA})
        and schema_version(conn) == LATEST
    )
    return _schema_needs(conn, STATE_SCHEMA, role, "the tool's own tables", create=not current) + (
        _state_tables(conn, role) if exists else []
    )


def _state_tables(conn: sa.Connection, role: str) -> list[Missing]:
    rows = conn.execute(
        sa.text(
            """SELECT c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE n.nspname = :s AND c.relkind IN ('r', 'p')
            AND NOT has_table_privilege(c.oid, 'SELECT, INSERT, UPDATE, DELETE')"""
        ),
        {"s": STATE_SCHEMA},
    ).scalars()
    found = sorted(rows)
    if not found:
        return []
    return [
        Missing(
            f"tables {', '.join(f'{STATE_SCHEMA}.{t}' for t in found)}",
            "SELECT, INSERT, UPDATE, DELETE",
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {STATE_SCHEMA} TO "
            f"{quote_ident(role)}; GRANT USAGE ON ALL SEQUENCES IN SCHEMA {STATE_SCHEMA} TO "
            f"{quote_ident(role)};",
        )
    ]


def _source_readable(conn: sa.Connection, spec: SourceSpec, role: str) -> list[Missing]:
    if spec.table is not None:
        table = quote_table(split_qualified(spec.table))
        if not conn.scalar(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}):
            return []  # reported by the diff, with its own fix
        if conn.scalar(sa.text("SELECT has_table_privilege(:t, 'SELECT')"), {"t": table}):
            return []
        return [
            Missing(
                f"table {spec.table} (the source)",
                "SELECT",
                f"GRANT SELECT ON {table} TO {quote_ident(role)};",
            )
        ]
    try:
        with conn.begin_nested() as probe:
            conn.execute(sa.text(f"SELECT * FROM ({spec.query}) AS q LIMIT 0"))
            probe.rollback()
    except sa.exc.DBAPIError as exc:
        fix = privilege_fix(str(exc.orig), role)
        if fix is None:
            return []  # another problem: the diff reports it with its own message
        return [Missing(f"source {spec.name!r} (its query)", "SELECT", fix)]
    return []


def _chunk_table(conn: sa.Connection, spec: SourceSpec, role: str) -> list[Missing]:
    if not spec.pgvector.enabled:
        return []
    schema, _ = spec.pg_table
    return _schema_needs(conn, schema, role, f"the pgvector table of {spec.name!r}")


def _triggers(conn: sa.Connection, spec: SourceSpec, role: str) -> list[Missing]:
    if spec.change_capture != "trigger" or spec.table is None:
        return []
    from embedding_assets.state.triggers import (
        CaptureTriggers,
        installed_signature,
        may_create_triggers,
        table_columns,
    )

    triggers = CaptureTriggers(spec, table_columns(conn, spec))
    if may_create_triggers(conn, triggers.table):
        return []
    if installed_signature(conn, triggers) is not None:
        return []  # installed by a DBA; a stale body is re-printed by `triggers sql`
    return [
        Missing(
            f"table {spec.table} (change_capture: trigger)",
            "TRIGGER (or the triggers installed by a DBA)",
            f"embedding-assets triggers sql --source {spec.name}  # run its output as the "
            f"table's owner; or GRANT TRIGGER ON {triggers.table} TO {quote_ident(role)};",
        )
    ]


def _write_back(conn: sa.Connection, spec: SourceSpec, role: str) -> list[Missing]:
    if spec.write_back is None:
        return []
    schema, table = spec.write_back_table
    relation = quote_table((schema, table))
    exists = conn.scalar(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": relation})
    if spec.write_back.table is not None and not exists:
        return _schema_needs(conn, schema, role, f"the write-back side table of {spec.name!r}")
    if not exists:
        return []
    columns = [
        c
        for c in spec.write_back.columns
        if conn.scalar(
            sa.text(
                "SELECT NOT attisdropped FROM pg_attribute "
                "WHERE attrelid = to_regclass(:t) AND attname = :c"
            ),
            {"t": relation, "c": c},
        )
    ]
    lacking = [
        c
        for c in columns
        if not conn.scalar(
            sa.text("SELECT has_column_privilege(:t, :c, 'UPDATE')"), {"t": relation, "c": c}
        )
    ]
    if not lacking:
        return []
    names = ", ".join(quote_ident(c) for c in lacking)
    return [
        Missing(
            f"columns {names} of {relation} (write_back)",
            "UPDATE",
            f"GRANT UPDATE ({names}) ON {relation} TO {quote_ident(role)};",
        )
    ]


def missing_privileges(engine: sa.Engine, spec: SourceSpec) -> list[Missing]:
    """Every privilege the configured role lacks for this source, with its fix (read only)."""
    with engine.connect() as conn:
        role = _role(conn)
        found = _state_schema(conn, role)
        found += _source_readable(conn, spec, role)
        found += _chunk_table(conn, spec, role)
        found += _triggers(conn, spec, role)
        found += _write_back(conn, spec, role)
        conn.rollback()
    return list(dict.fromkeys(found))  # one schema may be needed twice


def instance_storage_missing(engine: sa.Engine) -> list[Missing]:
    """Dagster's runs and events kept in this same database (no EMBEDDING_ASSETS_DAGSTER_PG_URL):
    its tables go to schema public, so the role needs CREATE there until they exist."""
    with engine.connect() as conn:
        if conn.scalar(sa.text("SELECT to_regclass('public.runs') IS NOT NULL")):
            return []
        if conn.scalar(sa.text("SELECT has_schema_privilege('public', 'CREATE')")):
            return []
        role = _role(conn)
    return [
        Missing(
            "schema public (Dagster's run and event storage, in DATABASE_URL's database)",
            "CREATE",
            "set EMBEDDING_ASSETS_DAGSTER_PG_URL to a database of Dagster's own "
            "(postgresql+psycopg2://...), or GRANT CREATE ON SCHEMA public TO "
            f"{quote_ident(role)};",
        )
    ]


class PrivilegeError(RuntimeError):
    """The role lacks privileges; the message lists each with the SQL that grants it."""


def require_privileges(engine: sa.Engine, spec: SourceSpec, instance_storage: bool = False) -> None:
    """Raise PrivilegeError naming each missing privilege and its fix; `instance_storage`:
    Dagster's storage is in this database too (checked by the CLI, which knows)."""
    missing = missing_privileges(engine, spec)
    if instance_storage:
        missing += instance_storage_missing(engine)
    if missing:
        raise PrivilegeError(
            f"source {spec.name!r}: the database role lacks what it needs, so nothing is "
            "embedded: " + " | ".join(m.line() for m in missing)
        )


_DENIED = re.compile(r"permission denied for (\w+) (\S+)")
_OWNER = re.compile(r"must be owner of (\w+) (\S+)")


def privilege_fix(message: str, role: str, database: str | None = None) -> str | None:
    """The SQL that grants what a Postgres privilege error names, or None if it names
    nothing this recognises."""
    who = quote_ident(role)
    if found := _OWNER.search(message):
        kind, name = found.group(1), found.group(2)
        return f"ALTER {kind.upper()} {name} OWNER TO {who}; (or have its owner run the statement)"
    found = _DENIED.search(message)
    if not found:
        return None
    kind, name = found.group(1), found.group(2)
    grants = {
        "database": f"GRANT CREATE ON DATABASE {name} TO {who}; (or create the schemas for "
        f"the role: CREATE SCHEMA ... AUTHORIZATION {who})",
        "schema": f"GRANT USAGE, CREATE ON SCHEMA {name} TO {who};",
        "table": f"GRANT SELECT ON {name} TO {who}; (a source; a table of ours also needs "
        "INSERT, UPDATE, DELETE)",
        "relation": f"GRANT SELECT ON {name} TO {who};",
        "sequence": f"GRANT USAGE ON SEQUENCE {name} TO {who};",
        "function": f"GRANT EXECUTE ON FUNCTION {name} TO {who};",
        "view": f"GRANT SELECT ON {name} TO {who};",
    }
    return grants.get(kind)


def row_security(conn: sa.Connection, spec: SourceSpec) -> list[dict]:
    """Row-level security on the source table and the write-back table: whether it is on,
    and whether this role bypasses it (superuser, BYPASSRLS, or the owner unless FORCE)."""
    tables = [".".join(split_qualified(spec.table))] if spec.table else []
    if spec.write_back is not None:
        tables.append(".".join(spec.write_back_table))
    found = []
    for table in dict.fromkeys(tables):
        applies = row_security_applies(conn, quote_table(split_qualified(table)))
        if applies is not None:
            found.append({"table": table, "row_level_security": True, "bypassed": not applies})
    return found


def row_security_applies(conn: sa.Connection, relation: str) -> bool | None:
    """Whether row-level security on `relation` (quoted) applies to this role: None when it
    is off (or there is no such table), False when the role bypasses it (superuser,
    BYPASSRLS, or the owner unless FORCE), True otherwise."""
    row = conn.execute(
        sa.text(
            """SELECT c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
                pg_get_userbyid(c.relowner) = current_user AS owner,
                r.rolsuper OR r.rolbypassrls AS bypass_role
            FROM pg_class AS c, pg_roles AS r
            WHERE c.oid = to_regclass(:t) AND r.rolname = current_user"""
        ),
        {"t": relation},
    ).one_or_none()
    if row is None or not row.enabled:
        return None
    return not (row.bypass_role or (row.owner and not row.forced))


def describe_row_security(entry: dict, spec: SourceSpec) -> str:
    if entry["bypassed"]:
        return (
            f"row-level security is on for {entry['table']}, and this role bypasses it: every "
            "row is embedded and readable in both sinks, whatever the policies hide"
        )
    return (
        f"row-level security is on for {entry['table']} and applies to this role: rows its "
        "policies hide are not embedded (and a write-back the policies refuse is recorded "
        f"as an error per row); `embedding-assets reconcile --source {spec.name}` after a "
        "policy change"
    )


def row_security_fingerprint(conn: sa.Connection, spec: SourceSpec) -> str:
    """What decides which source rows this role sees under row-level security: whether it is
    on (and forced), whether the role bypasses it, and every policy of the table. "none"
    for a `query:` source or a table without it."""
    if spec.table is None:
        return "none"
    row = conn.execute(
        sa.text(
            """SELECT c.relrowsecurity AS enabled, c.relforcerowsecurity AS forced,
                r.rolsuper OR r.rolbypassrls OR pg_get_userbyid(c.relowner) = current_user
                    AS privileged,
                (SELECT md5(string_agg(concat_ws('|', p.polname, p.polcmd, p.polpermissive,
                        CAST(p.polroles AS text), pg_get_expr(p.polqual, p.polrelid),
                        pg_get_expr(p.polwithcheck, p.polrelid)), ',' ORDER BY p.polname))
                 FROM pg_policy AS p WHERE p.polrelid = c.oid) AS policies
            FROM pg_class AS c, pg_roles AS r
            WHERE c.oid = to_regclass(:t) AND r.rolname = current_user"""
        ),
        {"t": quote_table(split_qualified(spec.table))},
    ).one_or_none()
    if row is None or not row.enabled:
        return "none"
    if row.privileged and not row.forced:
        return "bypassed"
    return f"applies:{row.policies or 'no policy'}"
