"""Metadata values travel by type: every common Postgres type, values Python cannot hold
(infinity, BC dates, NaN), and column names that are not identifiers reach pgvector as the
same values and Qdrant as JSON by the documented rules; a row whose own value cannot be
stored fails alone, and the clean rows of its shard are stored every time."""

import dagster as dg
import pytest
import sqlalchemy as sa

from embedding_assets.config.settings import load_settings
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.state.source_sql import quote_ident
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.fakes.provider_server import ProviderServer
from embedding_assets_tests.integration.helpers import (
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration

# column -> SQL type; the names are what a user's table may hold.
COLUMNS = {
    "tags": "text[]",
    "counts": "int[]",
    "extra": "jsonb",
    "doc_json": "json",
    "flag": "boolean",
    "score": "float8",
    "ratio": "real",
    "amount": "numeric",
    "born": "date",
    "seen": "timestamptz",
    "local_at": "timestamp",
    "days": "date[]",
    "blob": "bytea",
    "span": "interval",
    "addr": "inet",
    "uid": "uuid",
    "mood": "{mood}",
    "pair": "{pair}",
    "Unit Price": "numeric",
    "class": "text",
    "_private": "int",
    'Weird"Col': "text",
    "big": "bigint",
}

ROWS = {
    # ordinary values
    1: {
        "tags": '{a,"b c",NULL}',
        "counts": "{1,2,3}",
        "extra": '{"k": [1, "x"]}',
        "doc_json": '{"b": 1,  "a": 2}',
        "flag": "true",
        "score": "0.5",
        "ratio": "1.25",
        "amount": "12.50",
        "born": "1999-12-31",
        "seen": "2024-05-01 12:00:00+00",
        "local_at": "2024-05-01 12:00:00",
        "days": "{2020-01-01}",
        "blob": "\\x00ff10",
        "span": "1 mon 2 days 03:00:00",
        "addr": "10.0.0.0/8",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "mood": "happy",
        "pair": "(1,x)",
        "Unit Price": "9.99",
        "class": "premium",
        "_private": "7",
        'Weird"Col': "odd",
        "big": "9007199254740993",
    },
    # values Python's types cannot hold, and JSON null beside SQL NULL
    2: {
        "tags": "{}",
        "counts": "{}",
        "extra": "null",
        "doc_json": '"just a string"',
        "flag": "false",
        "score": "NaN",
        "ratio": "-Infinity",
        "amount": "NaN",
        "born": "0044-03-15 BC",
        "seen": "infinity",
        "local_at": "-infinity",
        "days": "{infinity,-infinity}",
        "blob": "\\x",
        "span": "-1 years",
        "addr": "::1",
        "uid": None,
        "mood": "sad",
        "pair": '(,"a b")',
        "Unit Price": "Infinity",
        "class": "",
        "_private": None,
        'Weird"Col': None,
        "big": "-1",
    },
    # every value SQL NULL
    3: {},
    # a clean row
    4: {"class": "plain", "extra": "42", "score": "Infinity", "born": "12000-01-01"},
}


def create_table(url: str, name: str) -> None:
    columns = ", ".join(
        f"{quote_ident(c)} {t.format(mood=f'{name}_mood', pair=f'{name}_pair')}"
        for c, t in COLUMNS.items()
    )
    with engine_for(url).begin() as conn:
        conn.execute(sa.text(f"CREATE TYPE {name}_mood AS ENUM ('happy', 'sad')"))
        conn.execute(sa.text(f"CREATE TYPE {name}_pair AS (n int, label text)"))
        conn.execute(
            sa.text(f"CREATE TABLE {name} (id int PRIMARY KEY, title text, body text, {columns})")
        )
        for row_id, values in ROWS.items():
            names = ", ".join(quote_ident(c) for c in values)
            params = ", ".join(f":p{i}" for i in range(len(values)))
            conn.execute(
                sa.text(
                    f"INSERT INTO {name} (id, title, body{', ' if values else ''}{names}) "
                    f"VALUES (:id, :title, 'body'{', ' if values else ''}{params})"
                ),
                {
                    "id": row_id,
                    "title": f"Doc {row_id}",
                    **{f"p{i}": v for i, v in enumerate(values.values())},
                },
            )


def as_text(url: str, relation: str, key: str) -> dict[str, tuple]:
    """Every metadata column as Postgres's text form, by id: equal text is an equal value."""
    cols = ", ".join(f"CAST({quote_ident(c)} AS text)" for c in COLUMNS)
    with engine_for(url).connect() as conn:
        rows = conn.execute(sa.text(f"SELECT CAST({key} AS text), {cols} FROM {relation}"))
        return {r[0]: tuple(r[1:]) for r in rows}


def payloads(runtime) -> dict[str, dict]:
    points = qdrant_store_from_env().retrieve(
        runtime.qdrant.collection, runtime.pgvector.stored_chunks(0)["point_id"].tolist()
    )
    return {p.payload["row_id"]: p.payload for p in points}


def test_every_metadata_type_reaches_pgvector_and_qdrant(postgres, home, tmp_path):
    name = unique_name()
    create_table(postgres, name)
    metadata = "[" + ", ".join('"' + c.replace('"', '\\"') + '"' for c in COLUMNS) + "]"
    with ProviderServer("openai", dim=8) as server:
        path = fake_embedder_settings(
            tmp_path, name, server.base_url, {}, {"shards": "1", "metadata": metadata}
        )
        settings = load_settings(path)
        with dg.DagsterInstance.ephemeral() as instance:
            assert sync_shards(settings, name, instance)["00"].success
        runtime = runtime_for(settings, name, postgres)

        # pgvector: the same values, to the last digit and sign (jsonb null is not NULL).
        source = as_text(postgres, name, "id")
        stored = as_text(postgres, runtime.pgvector.table, "row_id")
        assert stored == source and len(stored) == len(ROWS)
        assert stored["2"][list(COLUMNS).index("extra")] == "null"
        assert stored["3"][list(COLUMNS).index("extra")] is None

        # Qdrant: JSON values by the documented rules, under the columns' own names.
        got = payloads(runtime)
        assert set(got) == {"1", "2", "3", "4"}
        one, two, three, four = got["1"], got["2"], got["3"], got["4"]
        assert one["tags"] == ["a", "b c", None] and one["counts"] == [1, 2, 3]
        assert one["extra"] == {"k": [1, "x"]} and one["doc_json"] == {"a": 2, "b": 1}
        assert one["flag"] is True and one["score"] == 0.5 and one["ratio"] == 1.25
        assert one["amount"] == 12.5 and one["big"] == 9007199254740993
        assert one["born"] == "1999-12-31" and one["seen"] == "2024-05-01T12:00:00+00:00"
        assert one["local_at"] == "2024-05-01T12:00:00" and one["days"] == ["2020-01-01"]
        assert one["blob"] == "AP8Q"  # base64 of 00 ff 10
        assert one["span"] == "1 mon 2 days 03:00:00" and one["addr"] == "10.0.0.0/8"
        assert one["uid"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        assert one["mood"] == "happy" and one["pair"] == "(1,x)"
        assert one["Unit Price"] == 9.99 and one["class"] == "premium"
        assert one["_private"] == 7 and one['Weird"Col'] == "odd"
        assert one["text"] == "Doc 1: body" and one["row_id"] == "1"

        assert two["score"] == "NaN" and two["ratio"] == "-Infinity" and two["amount"] == "NaN"
        assert two["Unit Price"] == "Infinity"
        assert two["born"] == "0044-03-15 BC" and two["seen"] == "infinity"
        assert two["local_at"] == "-infinity" and two["days"] == ["infinity", "-infinity"]
        assert two["tags"] == [] and two["extra"] is None and two["doc_json"] == "just a string"
        assert two["blob"] == "" and two["pair"] == '(,"a b")' and two["class"] == ""
        assert two["uid"] is None and two["_private"] is None

        assert all(three[c] is None for c in COLUMNS)
        assert four["extra"] == 42 and four["score"] == "Infinity"
        assert four["born"] == "12000-01-01"

        # A value the pgvector column cannot hold fails its row only; the clean row of the
        # same shard is stored, and the failure is recorded with the reason.
        with engine_for(postgres).begin() as conn:
            # The readers' view pins the column types; the next run makes it again.
            conn.execute(sa.text(f"DROP VIEW {name}_embeddings"))
            conn.execute(
                sa.text(f"ALTER TABLE {runtime.pgvector.table} ALTER COLUMN _private TYPE smallint")
            )
            conn.execute(sa.text(f"UPDATE {name} SET _private = 100000 WHERE id = 1"))
            conn.execute(sa.text(f"UPDATE {name} SET class = 'changed' WHERE id = 4"))
        runtime.pgvector._columns_catalog = None  # the test altered the table
        with dg.DagsterInstance.ephemeral() as instance:
            result = sync_shards(settings, name, instance, raise_on_error=False)["00"]
        assert payloads(runtime)["4"]["class"] == "changed"
        assert as_text(postgres, runtime.pgvector.table, "row_id")["1"] == stored["1"]
        (error,) = runtime.errors.list()
        assert (error.row_id, error.kind, error.state) == ("1", "unstorable", "dead")
        assert "smallint" in error.message and "errors replay" in error.message
        dead_check = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
        assert dead_check["no_dead_rows"] is False  # the UI shows the failed row
        assert as_text(postgres, f"{name}_embeddings", "row_id")["4"]  # the view is back
