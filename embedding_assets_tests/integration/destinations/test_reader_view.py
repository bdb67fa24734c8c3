"""The readers' view (destinations.reader_view) on the real Postgres: the contract columns first,
the same metadata as the Qdrant payload, writes through it refused with a clear error (and the
chunk kept), and a view an earlier version published brought up to the contract by the next
sync, with nothing embedded."""

import pytest
import sqlalchemy as sa

from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import load_settings
from embedding_assets.destinations.reader_view import CONTRACT
from embedding_assets.state.db import engine_for
from embedding_assets.state.migrations import migrate
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration

ROWS = [
    {"id": i, "title": f"Doc {i}", "body": f"body {i}", "category": "a" if i % 2 else "b"}
    for i in range(1, 11)
]


@pytest.fixture
def synced(postgres, home, fake, tmp_path, instance):
    name = unique_name()
    create_docs_table(postgres, name, ROWS)
    settings = load_settings(
        fake_embedder_settings(
            tmp_path, name, fake.base_url, {}, {"shards": "2", "metadata": "[category, views]"}
        )
    )
    sync_shards(settings, name, instance)
    return settings, name


def view_columns(url: str, view: str) -> list[str]:
    with engine_for(url).connect() as conn:
        return list(
            conn.scalars(
                sa.text(
                    "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(:v) "
                    "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
                ),
                {"v": view},
            )
        )


def test_the_view_leads_with_the_contract_and_carries_the_payload_metadata(synced, postgres):
    _, name = synced
    view = f"public.{name}_embeddings"
    columns = view_columns(postgres, view)
    assert tuple(columns[: len(CONTRACT)]) == CONTRACT
    assert {"point_id", "chunk_text", "category", "views", "lexical"} <= set(columns)
    with engine_for(postgres).connect() as conn:
        row = conn.execute(
            sa.text(
                f"SELECT id, content, metadata, point_id, chunk_text FROM {view} WHERE row_id = '3'"
            )
        ).one()
    assert row.id == row.point_id and row.content == row.chunk_text == "Doc 3: body 3"
    assert row.metadata == {"row_id": "3", "chunk_index": 0, "category": "a", "views": 0}


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM {view} WHERE row_id = '3'",
        "UPDATE {view} SET content = 'x' WHERE row_id = '3'",
        "INSERT INTO {view} (id, content) VALUES (gen_random_uuid(), 'x')",
    ],
)
def test_a_write_through_the_view_fails_and_says_why(synced, postgres, statement) -> None:
    _, name = synced
    view = f"public.{name}_embeddings"
    refused = pytest.raises(sa.exc.DBAPIError, match="read-only readers' view")
    with refused as error, engine_for(postgres).begin() as conn:
        conn.execute(sa.text(statement.format(view=view)))
    assert "source table" in str(error.value.orig.diag.message_hint)
    with engine_for(postgres).connect() as conn:
        assert conn.scalar(sa.text(f"SELECT count(*) FROM {view} WHERE row_id = '3'")) == 1


def test_a_view_of_the_version_before_is_brought_to_the_contract_with_nothing_embedded(
    synced, postgres, fake, instance
) -> None:
    settings, name = synced
    view = f"public.{name}_embeddings"
    with engine_for(postgres).begin() as conn:  # what the version before published
        table = conn.scalar(sa.text(f"SELECT '{view}__g1'"))
        conn.execute(sa.text(f"DROP VIEW {view}"))
        conn.execute(sa.text(f"CREATE VIEW {view} AS SELECT * FROM {table}"))
    assert view_columns(postgres, view)[0] == "point_id"
    embedded = len(fake.requests)
    migrate(engine_for(postgres))
    sync_source(settings, name, None, instance)  # nothing pending: the view alone changes
    assert tuple(view_columns(postgres, view)[: len(CONTRACT)]) == CONTRACT
    assert len(fake.requests) == embedded
    with pytest.raises(sa.exc.DBAPIError, match="read-only"), engine_for(postgres).begin() as c:
        c.execute(sa.text(f"DELETE FROM {view}"))


def test_a_model_of_another_dimension_keeps_the_readers_views_over_ours_and_the_grants(
    synced, postgres, tmp_path, instance
) -> None:
    """Promoting a generation of another dimension must drop and make the view again: the
    views readers made over it (the README's one for LlamaIndex) and the grants on both are
    made again in the same transaction, and read the new vectors."""
    from embedding_assets_tests.fakes.provider_server import ProviderServer

    _, name = synced
    view, llama = f"public.{name}_embeddings", f"public.data_{name}_llama"
    role = f"{name}_reader"
    with engine_for(postgres).begin() as conn:
        conn.execute(sa.text(f"CREATE ROLE {role}"))
        conn.execute(
            sa.text(
                f"CREATE VIEW {llama} AS SELECT CAST(0 AS bigint) AS id, CAST(id AS varchar) "
                f"AS node_id, content AS text, metadata AS metadata_, embedding FROM {view}"
            )
        )
        conn.execute(sa.text(f"GRANT SELECT ON {view}, {llama} TO {role}"))
    with ProviderServer("openai", dim=16) as wider:
        settings = load_settings(
            fake_embedder_settings(
                tmp_path, name, wider.base_url, {"model": "wider-model", "dimension": "16"},
                {"shards": "2", "metadata": "[category, views]"},
            )
        )  # fmt: skip
        reports = sync_source(settings, name, None, instance)
    assert any(r.promoted_generation for r in reports), [r.error for r in reports]
    with engine_for(postgres).connect() as conn:
        dims = conn.scalar(sa.text(f"SELECT DISTINCT vector_dims(embedding) FROM {llama}"))
        granted = conn.execute(
            sa.text(
                "SELECT has_table_privilege(:r, :v, 'SELECT'), "
                "has_table_privilege(:r, :l, 'SELECT')"
            ),
            {"r": role, "v": view, "l": llama},
        ).one()
    assert dims == 16 and tuple(granted) == (True, True)
