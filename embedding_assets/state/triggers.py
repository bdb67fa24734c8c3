"""Capture triggers: statement-level AFTER INSERT / UPDATE / DELETE / TRUNCATE triggers on a
`table:` source that append (target, shard, row id) to `embedding_assets.change_queue`.

- Transition tables: one INSERT per statement, however many rows it touched.
- UPDATE enqueues a row only when a column the source uses changed: the id, the text
  template's columns, the metadata columns, and every column the `where` filter names.
  Columns are compared as text, so types without an equality operator (json) work too.
- An id change enqueues the old id (its vectors must go) and the new one.
- TRUNCATE enqueues every row the ledger holds, so their vectors are removed.
- Every entry goes to each generation the feed fills (live and building), looked up when the
  statement runs, so a new generation needs no new trigger; the watched columns cover the
  templates of every kept generation.
- The shard is computed at capture time with the same md5 expression as everywhere else.
- The function is SECURITY DEFINER: the application's role writes the source table and needs
  no privilege on our schema.
- A statement that queued rows notifies `LIVE_CHANNEL` with the source's name (delivered at
  commit, once per transaction): the live lane waits on it instead of polling.
"""

import hashlib
import re
from dataclasses import dataclass, replace

import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.sharding import shard_sql
from embedding_assets.state.ddl import STATE_SCHEMA
from embedding_assets.state.generations import ACTIVE_STATES
from embedding_assets.state.source_sql import (
    catalog_columns,
    quote_ident,
    quote_literal,
    quote_table,
)

OPERATIONS = ("insert", "update", "delete", "truncate")
LIVE_CHANNEL = "embedding_assets_changes"  # NOTIFY channel; the payload is the source's name
SIGNATURE_PREFIX = "embedding_assets capture "
_IDENTIFIER = re.compile(r'"((?:[^"]|"")+)"|([A-Za-z_][A-Za-z0-9_$]*)')


def trigger_name(source: str, operation: str) -> str:
    """A capture trigger's name (unquoted): one per source and operation."""
    return f"ea_{source}_{operation}"


def capture_function(source: str) -> str:
    """The source's capture function, qualified and quoted (without its `()`)."""
    return f"{STATE_SCHEMA}.{quote_ident('capture_' + source)}"


def drop_triggers_sql(source: str, table: str) -> str:
    """Statements dropping the source's capture triggers from `table` (quoted)."""
    return "\n".join(
        f"DROP TRIGGER IF EXISTS {quote_ident(trigger_name(source, op))} ON {table};"
        for op in OPERATIONS
    )


class TriggerPrivilegeError(RuntimeError):
    """This role may not create the capture triggers; the message carries the SQL."""


def where_columns(where: str | None, table_columns: list[str]) -> list[str]:
    """Table columns the raw `where` SQL names. A superset is harmless (a changed column
    that does not matter only enqueues a row that turns out current)."""
    if not where:
        return []
    named: set[str] = set()
    for quoted, bare in _IDENTIFIER.findall(re.sub(r"'(?:[^']|'')*'", "''", where)):
        named.add(quoted.replace('""', '"') if quoted else bare.lower())
    return [c for c in table_columns if c in named or c.lower() in named]


@dataclass(frozen=True)
class CaptureTriggers:
    """The trigger SQL of one source over its table."""

    spec: SourceSpec
    table_columns: tuple[str, ...]
    # Template columns of the source's other generations (their text may use others).
    extra_columns: tuple[str, ...] = ()
    # False: the function as versions before the live lane wrote it (no NOTIFY), to know
    # an install of theirs (`previous_body_signature`).
    notify: bool = True

    @property
    def table(self) -> str:
        return quote_table(split_qualified(self.spec.table or ""))

    @property
    def function(self) -> str:
        return capture_function(self.spec.name)

    def trigger_name(self, operation: str) -> str:
        return quote_ident(trigger_name(self.spec.name, operation))

    @property
    def watched_columns(self) -> list[str]:
        used = [
            self.spec.id_column,
            *self.spec.text_columns,
            *self.extra_columns,
            *self.spec.metadata,
            *where_columns(self.spec.where, list(self.table_columns)),
        ]
        # Sorted: every generation's runtime must write the same function, byte for byte.
        return sorted(set(used).intersection(self.table_columns))

    @property
    def _fed_targets(self) -> str:
        states = ", ".join(quote_literal(s) for s in ACTIVE_STATES)
        return (
            f"SELECT target FROM {STATE_SCHEMA}.generations "
            f"WHERE source = {quote_literal(self.spec.name)} AND state IN ({states})"
        )

    def _enqueue(self, ids_select: str) -> str:
        return (
            f"INSERT INTO {STATE_SCHEMA}.change_queue (target, shard, row_id) "
            f"SELECT g.target, {shard_sql('c.k', self.spec.shards)}, c.k "
            f"FROM ({ids_select}) AS c CROSS JOIN ({self._fed_targets}) AS g;" + self._notify()
        )

    def _notify(self) -> str:
        if not self.notify:
            return ""
        return (
            "\n        GET DIAGNOSTICS queued = ROW_COUNT;"
            "\n        IF queued > 0 THEN PERFORM pg_notify("
            f"{quote_literal(LIVE_CHANNEL)}, {quote_literal(self.spec.name)}); END IF;"
        )

    def function_sql(self) -> str:
        key = quote_ident(self.spec.id_column)

        def row(alias: str) -> str:
            return (
                "ROW("
                + ", ".join(f"CAST({alias}.{quote_ident(c)} AS text)" for c in self.watched_columns)
                + ")"
            )

        inserted = f"SELECT CAST(n.{key} AS text) AS k FROM new_rows AS n WHERE n.{key} IS NOT NULL"
        updated = (
            f"SELECT CAST(n.{key} AS text) AS k FROM new_rows AS n "
            f"LEFT JOIN old_rows AS o ON o.{key} = n.{key} WHERE n.{key} IS NOT NULL "
            f"AND (o.{key} IS NULL OR {row('o')} IS DISTINCT FROM {row('n')}) "
            f"UNION SELECT CAST(o.{key} AS text) FROM old_rows AS o "
            f"LEFT JOIN new_rows AS n ON n.{key} = o.{key} "
            f"WHERE o.{key} IS NOT NULL AND n.{key} IS NULL"
        )
        deleted = f"SELECT CAST(o.{key} AS text) AS k FROM old_rows AS o WHERE o.{key} IS NOT NULL"
        truncated = (
            f"INSERT INTO {STATE_SCHEMA}.change_queue (target, shard, row_id) "
            f"SELECT target, shard, row_id FROM {STATE_SCHEMA}.row_state "
            f"WHERE target IN ({self._fed_targets}) AND NOT deleted;" + self._notify()
        )
        declare = "DECLARE\n    queued bigint;\n" if self.notify else ""
        return f"""CREATE OR REPLACE FUNCTION {self.function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $capture$
{declare}BEGIN
    IF TG_OP = 'INSERT' THEN
        {self._enqueue(inserted)}
    ELSIF TG_OP = 'UPDATE' THEN
        {self._enqueue(updated)}
    ELSIF TG_OP = 'DELETE' THEN
        {self._enqueue(deleted)}
    ELSE
        {truncated}
    END IF;
    RETURN NULL;
END
$capture$;"""

    def install_sql(self) -> str:
        """Every statement that installs (or replaces) the triggers, for a DBA to run."""
        transitions = {
            "insert": "REFERENCING NEW TABLE AS new_rows",
            "update": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
            "delete": "REFERENCING OLD TABLE AS old_rows",
            "truncate": "",
        }
        statements = [
            self.function_sql(),
            f"COMMENT ON FUNCTION {self.function}() IS "
            f"{quote_literal(SIGNATURE_PREFIX + self.body_signature)};",
            # SECURITY DEFINER: nobody but the triggers may call it (PUBLIC could queue
            # made-up ids through a trigger of its own).
            f"REVOKE EXECUTE ON FUNCTION {self.function}() FROM PUBLIC;",
        ]
        for op in OPERATIONS:
            statements.append(f"DROP TRIGGER IF EXISTS {self.trigger_name(op)} ON {self.table};")
            statements.append(
                f"CREATE TRIGGER {self.trigger_name(op)} AFTER {op.upper()} ON {self.table} "
                f"{transitions[op]} FOR EACH STATEMENT EXECUTE FUNCTION {self.function}();"
            )
        return "\n".join(statements)

    def drop_sql(self) -> str:
        return (
            drop_triggers_sql(self.spec.name, self.table)
            + f"\nDROP FUNCTION IF EXISTS {self.function}();"
        )

    @property
    def body_signature(self) -> str:
        return hashlib.md5(self.function_sql().encode()).hexdigest()

    @property
    def previous_body_signature(self) -> str:
        """The signature the same triggers had before they notified the live lane: an
        install of that version captures every change, it only leaves the lane unwoken."""
        return replace(self, notify=False).body_signature

    @property
    def signature(self) -> str:
        return hashlib.md5(self.install_sql().encode()).hexdigest()

    def dba_sql(self, role: str) -> str:
        """What a DBA runs for `role` (the tool's), which may not create triggers: our
        schema and tables with the role's grants (the trigger writes into them from the
        first statement on), then the triggers, the function owned by the role and
        callable by nobody else."""
        from embedding_assets.state.migrations import dba_sql

        return (
            f"{dba_sql(role)}\n\n{self.install_sql()}\n"
            f"ALTER FUNCTION {self.function}() OWNER TO {quote_ident(role)};"
        )


def installed_signature(conn: sa.Connection, triggers: CaptureTriggers) -> str | None:
    """The signature in the installed capture function's comment (whoever installed it)."""
    comment = conn.scalar(
        sa.text("SELECT obj_description(to_regprocedure(:f), 'pg_proc')"),
        {"f": f"{triggers.function}()"},
    )
    if comment and comment.startswith(SIGNATURE_PREFIX):
        return comment.removeprefix(SIGNATURE_PREFIX)
    return None


def table_columns(conn: sa.Connection, spec: SourceSpec) -> tuple[str, ...]:
    return tuple(catalog_columns(conn, quote_table(split_qualified(spec.table or ""))))


def installed_triggers(conn: sa.Connection, triggers: CaptureTriggers) -> int:
    """How many of the source's capture triggers exist (enabled or not)."""
    return int(
        conn.scalar(
            sa.text(
                """SELECT count(*) FROM pg_trigger
                WHERE tgrelid = to_regclass(:rel) AND tgname = ANY(:names)"""
            ),
            {
                "rel": triggers.table,
                "names": [trigger_name(triggers.spec.name, op) for op in OPERATIONS],
            },
        )
    )


def function_warnings(conn: sa.Connection, triggers: CaptureTriggers) -> list[str]:
    """What is wrong with an installed capture function: another owner than this role (it
    runs as its owner), or EXECUTE left to PUBLIC."""
    row = conn.execute(
        sa.text(
            """SELECT pg_get_userbyid(p.proowner) AS owner, current_user AS me,
                has_function_privilege('public', p.oid, 'EXECUTE') AS public
            FROM pg_proc AS p WHERE p.oid = to_regprocedure(:f)"""
        ),
        {"f": f"{triggers.function}()"},
    ).one_or_none()
    if row is None:
        return []
    found = []
    if row.owner != row.me:
        found.append(
            f"capture function {triggers.function}() is owned by {row.owner!r}, not by this "
            f"role {row.me!r}: it runs with {row.owner!r}'s rights. As a DBA, run: ALTER "
            f"FUNCTION {triggers.function}() OWNER TO {quote_ident(row.me)};"
        )
    if row.public:
        found.append(
            f"capture function {triggers.function}() may be called by PUBLIC (any role could "
            f"queue made-up rows). Run: REVOKE EXECUTE ON FUNCTION {triggers.function}() "
            "FROM PUBLIC;"
        )
    return found


def may_create_triggers(conn: sa.Connection, table: str) -> bool:
    return bool(
        conn.scalar(
            sa.text("SELECT has_table_privilege(to_regclass(:rel), 'TRIGGER')"), {"rel": table}
        )
    )
