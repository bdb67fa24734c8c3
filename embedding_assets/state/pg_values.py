"""How a metadata value travels by its Postgres type, from the source row to the pgvector
column (the same type) and to the Qdrant payload (JSON). No value is ever sent as a repr.

- Into pgvector: types whose values Python holds exactly (text, numbers with NaN and
  ±Infinity, booleans, uuid, dates and timestamps) are read as Python values and written
  by binary COPY. Every other type (arrays, json/jsonb, bytea, interval, inet, money,
  enums, composites, ranges...) is read as Postgres's own text form and written back by
  text COPY, which Postgres parses with the column type's input function: an exact round
  trip for every type, jsonb `null` stays distinct from SQL NULL.
- Dates and timestamps that Python cannot hold (`infinity`, `-infinity`, BC dates, years
  past 9999) arrive as `PostgresText` instead of failing the read; a batch holding one is
  written by text COPY.
- Into Qdrant: the payload value is computed in SQL from the pgvector column (`to_jsonb`),
  with the rules of `payload_expr`.
"""

from typing import Any

from psycopg import DataError
from psycopg.types.datetime import DateLoader, TimestampLoader, TimestamptzLoader

# format_type names read as Python values and written by binary COPY.
NATIVE_TYPES = frozenset(
    {
        "text", "character varying", "character", "integer", "bigint", "smallint", "boolean",
        "double precision", "real", "numeric", "date", "timestamp without time zone",
        "timestamp with time zone", "uuid",
    }
)  # fmt: skip


class PostgresText(str):
    """A value in Postgres's text form, for a column of its own type (text COPY parses it)."""

    __slots__ = ()


def _tolerant(loader: type) -> type:
    class Tolerant(loader):
        def load(self, data: Any) -> Any:
            try:
                return super().load(data)
            except DataError:
                return PostgresText(bytes(data).decode())

    Tolerant.__name__ = f"Tolerant{loader.__name__}"
    return Tolerant


_TOLERANT = {
    "date": _tolerant(DateLoader),
    "timestamp": _tolerant(TimestampLoader),
    "timestamptz": _tolerant(TimestamptzLoader),
}


def register_tolerant_loaders(connection: Any) -> None:
    """On a psycopg connection: `infinity` and BC dates load as PostgresText, not an error."""
    for type_name, loader in _TOLERANT.items():
        connection.adapters.register_loader(type_name, loader)


def is_native(pg_type: str) -> bool:
    return pg_type in NATIVE_TYPES


def read_expr(column_sql: str, pg_type: str) -> str:
    """SQL reading a metadata column for the pgvector write: as itself, or as its text."""
    return column_sql if is_native(pg_type) else f"CAST({column_sql} AS text)"


def needs_text_copy(values: list[Any]) -> bool:
    """A value in text form can only be written by text COPY."""
    return any(isinstance(v, PostgresText) for v in values)


def payload_expr(column_sql: str, pg_type: str, type_kind: str) -> str:
    """SQL: the Qdrant payload value (jsonb) of a stored metadata column.

    Numbers stay numbers, except NaN and ±Infinity, which become the strings "NaN",
    "Infinity", "-Infinity"; booleans, text, enums, uuid, inet and interval as strings in
    Postgres's form; dates and timestamps as ISO 8601 strings (`infinity`, `-infinity` and
    BC dates as Postgres writes them); arrays as JSON arrays of those values; json and
    jsonb as themselves; bytea as base64; composite values as their text form.
    `type_kind` is pg_type.typtype ('c' for composite).
    """
    if pg_type == "bytea":
        return f"to_jsonb(translate(encode({column_sql}, 'base64'), E'\\n', ''))"
    if type_kind == "c":
        return f"to_jsonb(CAST({column_sql} AS text))"
    return f"to_jsonb({column_sql})"
