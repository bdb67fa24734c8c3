"""The bundled demo source: real package descriptions loaded into a Postgres table.

``data/pypi_packages.tsv.gz`` is every 10th data row (10,000 rows, header kept) of
``pypi_packages_100k.tsv.gz``: public PyPI metadata, columns name, version, month, summary;
tab-separated, one row per line, no quoting or escaping (summaries contain quotes and
backslashes, so rows go through COPY's own escaping, never as raw COPY text).
"""

from __future__ import annotations

import gzip
from importlib import resources

import sqlalchemy as sa
from sqlalchemy.schema import CreateTable

DEMO_TABLE = "public.pypi_packages"
DEMO_COLUMNS = ("name", "version", "month", "summary")
_DATA_FILE = "pypi_packages.tsv.gz"

Row = tuple[str, str, str, str]


def read_demo_rows(limit: int | None = None) -> list[Row]:
    """The bundled rows in file order; a repeated name keeps its first row (names are the key)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    raw = resources.files("embedding_assets").joinpath("data").joinpath(_DATA_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    header = tuple(lines[0].split("\t"))
    if header != DEMO_COLUMNS:
        raise ValueError(f"{_DATA_FILE}: expected columns {DEMO_COLUMNS}, got {header}")
    rows: list[Row] = []
    seen: set[str] = set()
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(DEMO_COLUMNS):
            raise ValueError(f"{_DATA_FILE}:{lineno}: expected 4 tab-separated fields")
        if fields[0] in seen:
            continue
        seen.add(fields[0])
        rows.append((fields[0], fields[1], fields[2], fields[3]))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def demo_table(table: str = DEMO_TABLE) -> sa.Table:
    """SQLAlchemy definition of the demo table ("schema.name" or "name")."""
    parts = table.split(".")
    if len(parts) > 2 or not all(parts):
        raise ValueError(f"table must be 'name' or 'schema.name', got {table!r}")
    schema, name = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])
    return sa.Table(
        name,
        sa.MetaData(),
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("version", sa.Text),
        sa.Column("month", sa.Text),
        sa.Column("summary", sa.Text),
        schema=schema,
    )


def load_demo(engine: sa.Engine, table: str = DEMO_TABLE, limit: int | None = None) -> int:
    """Create ``table`` if missing and, if it is empty, COPY the bundled rows into it.

    Idempotent and safe to run concurrently (a transaction-scoped advisory lock serialises
    loaders of the same table); a non-empty table is left as it is. Returns the table's row count.
    """
    tbl = demo_table(table)
    prep = engine.dialect.identifier_preparer
    qualified = prep.format_table(tbl)
    columns = ", ".join(prep.quote(c) for c in DEMO_COLUMNS)
    ddl = str(CreateTable(tbl, if_not_exists=True).compile(dialect=engine.dialect))

    raw = engine.raw_connection()  # psycopg 3 connection: COPY is not reachable through SQLAlchemy
    try:
        with raw.cursor() as cur:
            # Concurrent CREATE TABLE IF NOT EXISTS can still fail, and two loaders could both see
            # an empty table: take a lock per table for the whole transaction.
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"embedding_assets.demo:{table}",)
            )
            if tbl.schema is not None:
                cur.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (tbl.schema,))
                if cur.fetchone() is None:  # CREATE SCHEMA needs a privilege; only ask if missing
                    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {prep.quote_schema(tbl.schema)}")
            cur.execute(ddl)
            cur.execute(f"SELECT EXISTS (SELECT 1 FROM {qualified})")
            (has_rows,) = cur.fetchone()
            if not has_rows:
                rows = read_demo_rows(limit)
                with cur.copy(f"COPY {qualified} ({columns}) FROM STDIN") as copy:
                    for row in rows:
                        copy.write_row(row)
            cur.execute(f"SELECT count(*) FROM {qualified}")
            (count,) = cur.fetchone()
        raw.commit()
    except BaseException:
        raw.rollback()
        raise
    finally:
        raw.close()
    return int(count)
