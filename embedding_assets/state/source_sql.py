"""SQL over a configured source: its eligible rows, composed text and content hash.

The text template is composed in SQL, so finding pending rows is one query joining the
source with the stored row state, and Python receives exactly the text that was hashed.
Only `query:` and `where:` are raw SQL: they are trusted configuration.
"""

import string

from embedding_assets.config.base import split_qualified
from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.sharding import shard_sql
from embedding_assets.state.pg_values import read_expr


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_table(qualified: tuple[str, str]) -> str:
    return f"{quote_ident(qualified[0])}.{quote_ident(qualified[1])}"


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def raw_sql(fragment: str) -> str:
    """User SQL placed inside sqlalchemy.text(): escape colons so `:x` is not a bind param."""
    return fragment.replace(":", r"\:")


def meta_alias(index: int) -> str:
    # Metadata columns travel under fixed aliases so no user name can clash with ours.
    return f"m_{index}"


class SourceSql:
    def __init__(self, spec: SourceSpec, meta_types: list[str] | None = None):
        """`meta_types`: the metadata columns' Postgres types, which decide how each is
        read (see state.pg_values); without them every column is read as itself."""
        self.spec = spec
        self.meta_types = meta_types

    @property
    def relation(self) -> str:
        if self.spec.table:
            return f"{quote_table(split_qualified(self.spec.table))} AS s"
        return f"({raw_sql(self.spec.query or '')}) AS s"

    def column(self, name: str) -> str:
        return f"s.{quote_ident(name)}"

    def doc_expr(self) -> str:
        """concat() of the template's literals and columns; NULL columns read as ''."""
        parts: list[str] = []
        for literal, field, _, _ in string.Formatter().parse(self.spec.text):
            if literal:
                parts.append(raw_sql(quote_literal(literal)))
            if field:
                parts.append(f"CAST({self.column(field)} AS text)")
        return f"concat({', '.join(parts)})"

    def is_empty_expr(self) -> str:
        """True when every template column is NULL or blank: such a row gets no vector."""
        checks = [
            f"coalesce(btrim(CAST({self.column(c)} AS text)), '') = ''"
            for c in self.spec.text_columns
        ]
        return "(" + " AND ".join(checks) + ")"

    def meta_select(self) -> str:
        types = self.meta_types or ["text"] * len(self.spec.metadata)
        return "".join(
            f", {read_expr(self.column(c), t)} AS {meta_alias(i)}"
            for i, (c, t) in enumerate(zip(self.spec.metadata, types, strict=True))
        )

    def meta_json(self) -> str:
        cols = ", ".join(self.column(c) for c in self.spec.metadata)
        return f"CAST(jsonb_build_array({cols}) AS text)"

    def rows(
        self, shard: int | None = None, candidates: str | None = None, watermark: bool = False
    ) -> str:
        """SELECT of source rows: row_id, shard, eligible, doc, is_empty, content_hash, m_0..m_n.

        Without `candidates`: every eligible row (`eligible` is true). With `candidates`, a
        predicate over the source alias `s` (ids from a queue, a watermark window): only the
        rows it selects, eligible or not, so a row that left `where` is seen as a delete.
        content_hash covers the composed text and the metadata values, so a metadata change
        rewrites the row (its chunks are reused, so it costs no embedding).
        With `watermark`, also the watermark column's value and its text.
        """
        wm = ""
        if watermark:
            wm_col = self.column(self.spec.watermark_column or "")
            wm = f", {wm_col} AS watermark_value, CAST({wm_col} AS text) AS watermark"
        id_col = self.column(self.spec.id_column)
        user_where = f"({raw_sql(self.spec.where)})" if self.spec.where else "true"
        if candidates is None:
            where = f"WHERE {id_col} IS NOT NULL AND {user_where}"
            eligible = "true"
        else:
            where = f"WHERE {id_col} IS NOT NULL AND ({candidates})"
            eligible = f"coalesce({user_where}, false)"
        inner = (
            f"SELECT CAST({id_col} AS text) AS row_id, {eligible} AS eligible, "
            f"{self.doc_expr()} AS doc, {self.is_empty_expr()} AS is_empty, "
            f"{self.meta_json()} AS meta_json{self.meta_select()}{wm} "
            f"FROM {self.relation} {where}"
        )
        metas = ", r.watermark_value, r.watermark" if watermark else ""
        metas += "".join(f", r.{meta_alias(i)}" for i in range(len(self.spec.metadata)))
        shard_expr = shard_sql("r.row_id", self.spec.shards)
        shard_filter = f"WHERE {shard_expr} = {int(shard)}" if shard is not None else ""
        return (
            f"SELECT r.row_id, {shard_expr} AS shard, r.eligible, r.doc, r.is_empty, "
            f"md5(r.doc || chr(31) || r.meta_json) AS content_hash{metas} "
            f"FROM ({inner}) AS r {shard_filter}"
        )

    def ids_predicate(self, id_type: str, param: str = "ids") -> str:
        """Candidates by id: `s.id = ANY(:ids)` cast to the id column's own type, so the
        lookup uses the source's primary-key index."""
        return f"{self.column(self.spec.id_column)} = ANY(CAST(:{param} AS {id_type}[]))"

    def column_types_probe(self, columns: list[str]) -> str:
        """A query returning no rows whose columns carry these source columns' types."""
        cols = ", ".join(self.column(c) for c in columns) or "1"
        return f"SELECT {cols} FROM {self.relation} LIMIT 0"

    def metadata_probe(self) -> str:
        """A query returning no rows whose columns carry the metadata columns' types."""
        return self.column_types_probe(self.spec.metadata)


def column_types(conn, probe_sql: str) -> list[str]:
    """Postgres type names (format_type) of the columns a LIMIT 0 probe query returns."""
    import sqlalchemy as sa

    cursor = conn.connection.driver_connection.cursor()
    try:
        cursor.execute(probe_sql.replace(r"\:", ":"))
        oids = [col.type_code for col in cursor.description]
    finally:
        cursor.close()
    return [conn.scalar(sa.text("SELECT format_type(:oid, NULL)"), {"oid": oid}) for oid in oids]


def catalog_columns(conn, relation: str) -> dict[str, tuple[str, str]]:
    """{column: (format_type name, pg_type.typtype)} of a table (`relation` quoted, e.g.
    quote_table(...)), in column order, from the catalog: a lock on the table does not
    block it. {} when the table does not exist."""
    import sqlalchemy as sa

    rows = conn.execute(
        sa.text(
            """SELECT a.attname, format_type(a.atttypid, NULL) AS type, t.typtype
            FROM pg_attribute AS a JOIN pg_type AS t ON t.oid = a.atttypid
            WHERE a.attrelid = to_regclass(:rel) AND a.attnum > 0 AND NOT a.attisdropped
            ORDER BY a.attnum"""
        ),
        {"rel": relation},
    ).fetchall()
    return {r.attname: (r.type, r.typtype) for r in rows}
