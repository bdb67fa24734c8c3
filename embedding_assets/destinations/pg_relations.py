"""Relations of the pgvector side: names that fit Postgres' 63 characters, what a relation is, the
readers' view over a generation's table, and adopting a table from before generations."""

import hashlib

import sqlalchemy as sa

from embedding_assets.destinations.reader_view import reader_select, refuse_writes
from embedding_assets.state.ddl import ensure_schema
from embedding_assets.state.source_sql import (
    quote_ident,
    quote_table,
)

POSTGRES_NAME_LIMIT = 63  # longer identifiers are cut silently, and two cut names may clash


INDEX_SUFFIXES = ("_embedding_hnsw", "_chunk_hash", "_shard")


def relation_name(table: str, suffix: str) -> str:
    """`table + suffix` if Postgres keeps it whole, else a shortened name with a hash of the
    full one, so the indexes of `docs__g1` and `docs__g2` never share a name."""
    name = table + suffix
    if len(name) <= POSTGRES_NAME_LIMIT:
        return name
    digest = hashlib.md5(name.encode()).hexdigest()[:8]
    return f"{table[: POSTGRES_NAME_LIMIT - len(suffix) - 9]}_{digest}{suffix}"


def relation_kind(conn: sa.Connection, schema: str, name: str) -> str | None:
    """pg_class.relkind of schema.name ('r' table, 'v' view, ...), None if there is none."""
    return conn.scalar(
        sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"),
        {"t": f"{quote_ident(schema)}.{quote_ident(name)}"},
    )


def view_reads(conn: sa.Connection, schema: str, view: str) -> str | None:
    """The table (schema.name) a view reads, or None if `view` is no view."""
    return conn.scalar(
        sa.text(
            """SELECT DISTINCT n.nspname || '.' || c.relname
            FROM pg_rewrite AS r JOIN pg_depend AS d ON d.objid = r.oid
                AND d.classid = 'pg_rewrite'::regclass
            JOIN pg_class AS c ON c.oid = d.refobjid AND c.oid <> r.ev_class
            JOIN pg_namespace AS n ON n.oid = c.relnamespace
            WHERE r.ev_class = to_regclass(:v) AND c.relkind IN ('r', 'p')"""
        ),
        {"v": f"{quote_ident(schema)}.{quote_ident(view)}"},
    )


def publish_view(conn: sa.Connection, stable: tuple[str, str], table: tuple[str, str]) -> None:
    """Make the stable view read `table` (the columns of `reader_view`, writes refused), in
    the caller's transaction: readers see the old generation until it commits and the new one
    after, never a mix. A view of another dimension or column order (one published by an
    earlier version) cannot be replaced in place, so it is dropped and created again (still
    one transaction), and so are the readers' views over it, with every grant."""
    schema, view = stable
    kind = relation_kind(conn, schema, view)
    if kind not in (None, "v"):
        raise RuntimeError(
            f"{schema}.{view} is a table, not the view embedding_assets keeps for readers; "
            "rename or drop it (or set another `pgvector: {table: ...}`)"
        )
    select = reader_select(conn, table)
    target = quote_table(stable)
    ensure_schema(conn, schema)
    replaced, kept, grants = False, [], []
    if kind == "v":
        try:
            with conn.begin_nested():
                conn.execute(sa.text(f"CREATE OR REPLACE VIEW {target} AS {select}"))
            replaced = True
        except sa.exc.DBAPIError:
            # Readers' own views over ours (LlamaIndex's, say) and the grants of all of them
            # would go with the drop: they are made again, as they were, after it.
            kept = views_over(conn, target)
            grants = view_grants(conn, target)
            conn.execute(sa.text(f"DROP VIEW {target} CASCADE"))
    if not replaced:
        conn.execute(sa.text(f"CREATE VIEW {target} AS {select}"))
        if kind == "v":
            _restore(conn, [(target, None, grants), *kept])
    refuse_writes(conn, stable)


def views_over(conn: sa.Connection, view: str) -> list[tuple[str, str, list[str]]]:
    """(name, definition, GRANT statements) of the views that read `view`, and of those that
    read them, parents first."""
    found: list[tuple[str, str, list[str]]] = []
    queue = [view]
    while queue:
        rows = conn.execute(
            sa.text(
                """SELECT DISTINCT format('%I.%I', n.nspname, v.relname) AS name,
                    pg_get_viewdef(v.oid) AS definition
                FROM pg_depend AS d JOIN pg_rewrite AS r ON r.oid = d.objid
                JOIN pg_class AS v ON v.oid = r.ev_class
                JOIN pg_namespace AS n ON n.oid = v.relnamespace
                WHERE d.classid = 'pg_rewrite'::regclass AND d.refobjid = to_regclass(:v)
                    AND v.oid <> d.refobjid AND v.relkind = 'v'"""
            ),
            {"v": queue.pop(0)},
        ).fetchall()
        for row in rows:
            if all(row.name != name for name, _, _ in found):
                found.append((row.name, row.definition, view_grants(conn, row.name)))
                queue.append(row.name)
    return found


def view_grants(conn: sa.Connection, view: str) -> list[str]:
    """GRANT statements giving back the privileges others hold on `view`."""
    rows = conn.execute(
        sa.text(
            """SELECT a.privilege_type, CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                    ELSE quote_ident(pg_get_userbyid(a.grantee)) END AS grantee
            FROM pg_class AS c, aclexplode(c.relacl) AS a
            WHERE c.oid = to_regclass(:v) AND a.grantee <> c.relowner"""
        ),
        {"v": view},
    ).fetchall()
    return [f"GRANT {r.privilege_type} ON {view} TO {r.grantee}" for r in rows]


def _restore(conn: sa.Connection, views: list[tuple[str, str | None, list[str]]]) -> None:
    for name, definition, grants in views:
        if definition is not None:
            conn.execute(sa.text(f"CREATE VIEW {name} AS {definition}"))
        for grant in grants:
            conn.execute(sa.text(grant))


def adopt_table(conn: sa.Connection, stable: tuple[str, str], table: tuple[str, str]) -> None:
    """A chunk table made before generations existed becomes generation 1: renamed with its
    indexes, and the stable name becomes a view over it, in the caller's transaction."""
    schema, old = stable
    new = table[1]
    conn.execute(sa.text(f"ALTER TABLE {quote_table(stable)} RENAME TO {quote_ident(new)}"))
    for suffix in INDEX_SUFFIXES:
        conn.execute(
            sa.text(
                f"ALTER INDEX IF EXISTS {quote_ident(schema)}.{quote_ident(old + suffix)} "
                f"RENAME TO {quote_ident(relation_name(new, suffix))}"
            )
        )
    publish_view(conn, stable, table)
