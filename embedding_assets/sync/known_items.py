"""Known-item queries made from a source's own rows, for users without labelled queries: for a
sample of rows, the value of the text template's first column (a name, a title) and a few
of the row's most distinctive words (the rarest in the chunk table), each with that row as
the one relevant answer. A smoke test of retrieval, not a benchmark: the queries come from
the very text that was embedded.
"""

import re

import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.state.source_sql import quote_ident, quote_table
from embedding_assets.sync.runtime import SourceRuntime

WORDS_PER_QUERY = 4
_WORD = re.compile(r"^[^\W\d_][\w.-]{2,}$")  # a word, not a number or a stray character


def known_item_queries(runtime: SourceRuntime, count: int) -> list[dict]:
    """Up to `count` rows (a stable sample), each giving a `name` and a `words` query."""
    table = runtime.pgvector.table
    with runtime.engine.connect() as conn:
        # The words as Postgres's `simple` configuration cuts them, as lexical search does.
        sample = conn.execute(
            sa.text(
                f"""SELECT row_id, tsvector_to_array(to_tsvector('simple', chunk_text)) AS words
                FROM {table} WHERE chunk_index = 0 ORDER BY md5(row_id) LIMIT :n"""
            ),
            {"n": count},
        ).fetchall()
        rarity = _document_frequency(conn, table, {w for r in sample for w in r.words})
        names = _first_column_values(conn, runtime, [r.row_id for r in sample])
    queries = []
    for row in sample:
        name = names.get(row.row_id)
        if name and len(name) <= 80 and "\n" not in name:
            queries.append({"query": name, "relevant": [row.row_id], "kind": "name"})
        words = sorted(
            (w for w in row.words if _WORD.match(w)), key=lambda w: (rarity.get(w, 0), w)
        )[:WORDS_PER_QUERY]
        if len(words) >= 3:
            queries.append({"query": " ".join(words), "relevant": [row.row_id], "kind": "words"})
    return queries


def _document_frequency(conn: sa.Connection, table: str, wanted: set[str]) -> dict[str, int]:
    """In how many chunks each of the `wanted` words occurs (simple configuration: as
    written); one pass over the chunk table (`ts_stat`)."""
    inner = f"SELECT to_tsvector('simple', chunk_text) FROM {table}".replace("'", "''")
    rows = conn.execute(sa.text(f"SELECT word, ndoc FROM ts_stat('{inner}')")).fetchall()
    return {word: int(n) for word, n in rows if word in wanted}


def _first_column_values(
    conn: sa.Connection, runtime: SourceRuntime, ids: list[str]
) -> dict[str, str]:
    """Each row's value of the template's first column, read from the source."""
    spec = runtime.spec
    column = quote_ident(spec.text_columns[0])
    key = quote_ident(spec.id_column)
    source = quote_table(split_qualified(spec.table)) if spec.table else f"({spec.query}) AS q"
    rows = conn.execute(
        sa.text(
            f"SELECT CAST({key} AS text), CAST({column} AS text) FROM {source} "
            f"WHERE CAST({key} AS text) = ANY(:ids)"
        ),
        {"ids": ids},
    ).fetchall()
    return {row_id: value for row_id, value in rows if value}
