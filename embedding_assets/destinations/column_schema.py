"""The write-back column's schema: the columns (or side table) a generation writes, created in a
short transaction or handed to a DBA as SQL, and renamed with the readers' switch at promotion."""

import sqlalchemy as sa

from embedding_assets.config.sources import SourceSpec
from embedding_assets.state.ddl import schema_exists
from embedding_assets.state.source_sql import (
    catalog_columns,
    quote_ident,
    quote_table,
)

INSUFFICIENT_PRIVILEGE = "42501"


LOCK_NOT_AVAILABLE = "55P03"


DDL_LOCK_TIMEOUT = "5s"


class WriteBackError(RuntimeError):
    """The write-back column cannot be created or written; the message holds the SQL to run."""


def generation_column(name: str, number: int, live: bool) -> str:
    return name if live else f"{name}__g{number}"


def swap_columns(
    conn: sa.Connection, spec: SourceSpec, old_live: int | None, new_live: int
) -> None:
    """Promotion, in its transaction: the old live generation's columns take their
    `__g<old>` names and the new one's lose their `__g<new>` suffix."""
    if spec.write_back is None:
        return
    relation = quote_table(spec.write_back_table)
    # A rename waits for the application's transactions on the table: briefly, else the
    # promotion fails whole and is tried again after the next write.
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
    existing = catalog_columns(conn, relation)
    for name in spec.write_back.columns:
        shadow = generation_column(name, new_live, live=False)
        if shadow not in existing:
            continue  # this generation never wrote the column (write_back added later)
        if name in existing:
            if old_live is None:
                raise WriteBackError(
                    f"{relation} has a column {name!r} that no live generation of "
                    f"{spec.name!r} owns; rename or drop it, then promote again"
                )
            retired = quote_ident(generation_column(name, old_live, live=False))
            conn.execute(
                sa.text(f"ALTER TABLE {relation} RENAME COLUMN {quote_ident(name)} TO {retired}")
            )
        conn.execute(
            sa.text(
                f"ALTER TABLE {relation} RENAME COLUMN {quote_ident(shadow)} TO {quote_ident(name)}"
            )
        )


def drop_columns(conn: sa.Connection, spec: SourceSpec, number: int) -> None:
    """A dropped generation's shadow columns go with it."""
    if spec.write_back is None:
        return
    relation = quote_table(spec.write_back_table)
    for name in spec.write_back.columns:
        shadow = quote_ident(generation_column(name, number, live=False))
        conn.execute(sa.text(f"ALTER TABLE {relation} DROP COLUMN IF EXISTS {shadow}"))


class ColumnSchema:
    """Creating and checking this generation's columns (a mixin of ColumnDestination)."""

    def ddl(self, dimension: int, live: bool, conn: sa.Connection) -> list[str]:
        """What creates this generation's columns (and the side table), for us or a DBA."""
        types = {self.columns(live)[0]: f"vector({int(dimension)})"}
        if self.write_back.model_column:
            types[generation_column(self.write_back.model_column, self.number, live)] = "text"
        if self.write_back.embedded_at_column:
            at = generation_column(self.write_back.embedded_at_column, self.number, live)
            types[at] = "timestamptz"
        statements = []
        if self.side_table:
            schema = self.qualified[0]
            if not schema_exists(conn, schema):  # IF NOT EXISTS still needs database CREATE
                statements.append(f"CREATE SCHEMA {quote_ident(schema)}")
            statements.append(
                f"CREATE TABLE IF NOT EXISTS {self.relation} ("
                f"{quote_ident(self.spec.id_column)} {self.id_type(conn)} PRIMARY KEY)"
            )
        statements += [
            f"ALTER TABLE {self.relation} ADD COLUMN IF NOT EXISTS {quote_ident(c)} {t}"
            for c, t in types.items()
        ]
        return statements

    def prepare(self, conn: sa.Connection, dimension: int, live: bool, enqueue: bool) -> int:
        """Create this generation's columns if missing (a role that may not alter the table
        gets the exact SQL for a DBA). A column with no vector yet while the ledger holds
        embedded rows (new, made by a DBA, or dropped and added again) is filled: those rows
        are pending again, queued unless the feed is the diff, and their chunks are reused,
        so nothing is embedded twice. Returns the rows made pending."""
        if self.ready == (dimension, live):
            return 0
        existing = catalog_columns(conn, self.relation)
        if not all(c in existing for c in self.columns(live)):
            statements = self.ddl(dimension, live, conn)
            try:
                with conn.begin_nested():
                    # ALTER TABLE queues behind the application's open transactions, and
                    # its queries queue behind it: wait briefly, then fail (retried later).
                    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
                    for statement in statements:
                        conn.execute(sa.text(statement))
            except sa.exc.DBAPIError as exc:
                state = getattr(exc.orig, "sqlstate", None)
                if state == LOCK_NOT_AVAILABLE:
                    raise WriteBackError(
                        f"could not add the write-back column to {self.relation} within "
                        f"{DDL_LOCK_TIMEOUT}: long transactions hold the table. The run is "
                        "retried; or add it yourself: " + "; ".join(statements)
                    ) from exc
                if state != INSUFFICIENT_PRIVILEGE:
                    raise
                raise WriteBackError(self._privilege_message(conn, statements, live)) from exc
        self._require_shape(conn, live, dimension)
        refilled = self._pending_again(conn, enqueue) if self._empty(conn, live) else 0
        self.ready = (dimension, live)
        return refilled

    def _empty(self, conn: sa.Connection, live: bool) -> bool:
        column = quote_ident(self.columns(live)[0])
        return not conn.scalar(
            sa.text(f"SELECT EXISTS (SELECT 1 FROM {self.relation} WHERE {column} IS NOT NULL)")
        )

    def _require_shape(self, conn: sa.Connection, live: bool, dimension: int) -> None:
        vector = self.columns(live)[0]
        declared = conn.scalar(
            sa.text(
                "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                "WHERE attrelid = to_regclass(:rel) AND attname = :col AND NOT attisdropped"
            ),
            {"rel": self.relation, "col": vector},
        )
        if declared != f"vector({int(dimension)})":
            raise WriteBackError(
                f"write_back column {vector!r} of {self.relation} is {declared}, but "
                f"{self.spec.name!r} writes vector({int(dimension)}) vectors: rename or drop "
                "that column, or name another in write_back.column"
            )
        for column in self.columns(live):
            allowed = conn.scalar(
                sa.text("SELECT has_column_privilege(:rel, :col, 'UPDATE')"),
                {"rel": self.relation, "col": column},
            )
            if not allowed:
                names = ", ".join(quote_ident(c) for c in self.columns(live))
                role = quote_ident(conn.scalar(sa.text("SELECT current_user")))
                raise WriteBackError(
                    f"this role may not write column {column!r} of {self.relation}. Ask a DBA "
                    f"to run: GRANT UPDATE ({names}) ON {self.relation} TO {role};"
                )

    def _privilege_message(self, conn: sa.Connection, statements: list[str], live: bool) -> str:
        role = conn.scalar(sa.text("SELECT current_user"))
        grant = (
            f"GRANT SELECT, INSERT, UPDATE ON {self.relation} TO {quote_ident(role)};"
            if self.side_table
            else f"GRANT UPDATE ({', '.join(quote_ident(c) for c in self.columns(live))}) "
            f"ON {self.relation} TO {quote_ident(role)};"
        )
        sql = ";\n".join(statements) + ";\n" + grant
        return (
            f"write_back for source {self.spec.name!r}: role {role!r} may not create the "
            f"{'side table' if self.side_table else 'vector column'} in {self.relation}. "
            f"Ask a DBA to run:\n{sql}\nor set write_back.table to a side table this role "
            "may create."
        )
