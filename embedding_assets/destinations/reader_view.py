"""The readers' view of a source: a stable, read-only relation over the live generation's chunk
table, with the columns LangChain, LlamaIndex and plain SQL clients default to or take as
arguments, first and in a fixed order:

    id (uuid, the Qdrant point id), content (the chunk text), metadata (jsonb: row_id,
    chunk_index and the source's metadata columns), embedding (vector(d)), row_id,
    chunk_index

then the chunk table's own columns (point_id, chunk_text, shard, model, the metadata
columns, ...) as before, for readers written against them. A column that would repeat a
contract name (a metadata column called `content`, say) is left to `metadata`.

Writes through it fail with an error that says what it is (an INSTEAD OF trigger calling
`embedding_assets.refuse_reader_write()`, migration 7): it is a simple view over one table,
which Postgres would otherwise let a client's `delete()` write through.
"""

import sqlalchemy as sa

from embedding_assets.state.ddl import REFUSE_READER_WRITE
from embedding_assets.state.pg_values import payload_expr
from embedding_assets.state.source_sql import (
    catalog_columns,
    quote_ident,
    quote_literal,
    quote_table,
)

CONTRACT = ("id", "content", "metadata", "embedding", "row_id", "chunk_index")
# The chunk table's own columns: everything else in it is a metadata column.
OWN_COLUMNS = frozenset(
    {
        "point_id",
        "row_id",
        "chunk_index",
        "shard",
        "chunk_text",
        "chunk_hash",
        "token_count",
        "model",
        "embedding",
        "updated_at",
        "lexical",
    }
)
TRIGGER = "embedding_assets_read_only"


def reader_select(conn: sa.Connection, table: tuple[str, str]) -> str:
    """The view's SELECT over the chunk table `table` (see the module docstring)."""
    qualified = quote_table(table)
    columns = catalog_columns(conn, qualified)
    # As the Qdrant payload has them (one object per column, joined: jsonb_build_object
    # takes at most 100 arguments).
    parts = ["jsonb_build_object('row_id', t.row_id, 'chunk_index', t.chunk_index)"] + [
        f"jsonb_build_object({quote_literal(name)}, "
        f"{payload_expr('t.' + quote_ident(name), *kinds)})"
        for name, kinds in columns.items()
        if name not in OWN_COLUMNS
    ]
    contract = [
        "t.point_id AS id",
        "t.chunk_text AS content",
        f"({' || '.join(parts)}) AS metadata",
        "t.embedding",
        "t.row_id",
        "t.chunk_index",
    ]
    rest = [f"t.{quote_ident(name)}" for name in columns if name not in CONTRACT]
    return f"SELECT {', '.join(contract + rest)} FROM {qualified} AS t"


def refuse_writes(conn: sa.Connection, view: tuple[str, str]) -> None:
    """(Re)attach the trigger that turns any write through the view into a clear error."""
    target = quote_table(view)
    conn.execute(sa.text(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {target}"))
    conn.execute(
        sa.text(
            f"CREATE TRIGGER {TRIGGER} INSTEAD OF INSERT OR UPDATE OR DELETE ON {target} "
            f"FOR EACH ROW EXECUTE FUNCTION {REFUSE_READER_WRITE}()"
        )
    )


def is_current(conn: sa.Connection, view: tuple[str, str]) -> bool:
    """Whether the view has this version's contract columns and refuses writes (a view
    published by an earlier version is `SELECT *` and writable)."""
    target = quote_table(view)
    if conn.scalar(sa.text("SELECT to_regclass(:v)"), {"v": target}) is None:
        return True  # nothing published yet: nothing to bring up to date
    names = list(catalog_columns(conn, target))
    guarded = conn.scalar(
        sa.text(
            "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(:v) "
            "AND tgname = :g)"
        ),
        {"v": target, "g": TRIGGER},
    )
    return tuple(names[: len(CONTRACT)]) == CONTRACT and bool(guarded)
