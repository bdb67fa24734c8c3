"""The reader contract, read by the clients applications use, with constructor arguments only:
langchain-postgres's PGVectorStore on the readers' view, llama-index's PGVectorStore on the
README's one-statement view over it, and langchain-qdrant, llama-index's QdrantVectorStore and
qdrant-client's query_points on the alias. Each gets the same top 5 as `search --json`, with
the chunk text and the metadata.

The clients run in their own environment (.venv-readers: llama-index pins SQLAlchemy < 2.1).
No Qdrant server can run here: the sync writes through qdrant-client's server code path (its
in-process mode, the collection and the alias as on a server), and the points are copied into
qdrant-client's local mode on disk, which the clients' process opens."""

import json
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from embedding_assets.cli.search import search_source
from embedding_assets.config.settings import load_settings
from embedding_assets.ops.environment import qdrant_store_from_env
from embedding_assets.state.db import engine_for
from embedding_assets.sync.generations import runtime_for
from embedding_assets_tests.integration.helpers import (
    create_docs_table,
    fake_embedder_settings,
    sync_shards,
    unique_name,
)

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
READERS = ROOT / ".venv-readers" / "bin" / "python"
SCRIPT = ROOT / "embedding_assets_tests" / "readers" / "read_with_clients.py"
TOPICS = ["gardening", "databases", "astronomy", "cooking", "sailing"]
ROWS = [
    {
        "id": i,
        "title": f"{TOPICS[i % 5].title()} note {i}",
        "body": f"notes on {TOPICS[i % 5]}, part {i}",
        "category": TOPICS[i % 5],
        "views": i * 10,
    }
    for i in range(1, 61)
]


def copy_to_local_mode(source_client, collection: str, alias: str, path: Path) -> None:
    """The collection (vectors, payloads, config) and its alias, in qdrant-client's local
    mode on disk: what a Qdrant server would hold."""
    from qdrant_client import QdrantClient, models

    params = source_client.get_collection(collection).config.params
    points, offset = [], None
    while True:
        batch, offset = source_client.scroll(
            collection, limit=256, offset=offset, with_payload=True, with_vectors=True
        )
        points.extend(batch)
        if offset is None:
            break
    local = QdrantClient(path=str(path))
    local.create_collection(
        collection,
        vectors_config=params.vectors,
        sparse_vectors_config=params.sparse_vectors,
    )
    local.upsert(
        collection,
        [models.PointStruct(id=p.id, vector=p.vector, payload=p.payload) for p in points],
    )
    local.update_collection_aliases(
        change_aliases_operations=[
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        ]
    )
    local.close()


def test_each_client_reads_the_same_top_5_as_search_json(
    postgres, home, fake, tmp_path, instance, monkeypatch
) -> None:
    if not READERS.exists():
        pytest.skip(f"{READERS} is missing: run scripts/install-readers.sh (make test does)")
    monkeypatch.setenv("QDRANT_URL", ":memory:")
    name = unique_name()
    create_docs_table(postgres, name, ROWS)
    settings = load_settings(
        fake_embedder_settings(
            tmp_path, name, fake.base_url, {}, {"shards": "2", "metadata": "[category, views]"}
        )
    )
    sync_shards(settings, name, instance)
    query = "notes on astronomy"
    ours = {
        backend: search_source(settings, name, query, 5, backend, mode="dense")
        for backend in ("pgvector", "qdrant")
    }
    runtime = runtime_for(settings, name, postgres, "live", register=False)
    vector = [float(x) for x in runtime.embedder.embed_query(query)]
    store = qdrant_store_from_env()
    copy_to_local_mode(
        store._client, runtime.qdrant.collection, settings.source(name).qdrant_collection,
        tmp_path / "qdrant-local",
    )  # fmt: skip
    llama_view = f"{name}_llama"
    with engine_for(postgres).begin() as conn:  # the README's statement for llama-index
        conn.execute(
            sa.text(
                f"CREATE VIEW public.data_{llama_view} AS SELECT CAST(0 AS bigint) AS id, "
                "CAST(id AS varchar) AS node_id, content AS text, metadata AS metadata_, "
                f"embedding FROM public.{name}_embeddings"
            )
        )
    request = {
        "pg_url": postgres,
        "schema": "public",
        "view": f"{name}_embeddings",
        "llama_view": llama_view,
        "qdrant_path": str(tmp_path / "qdrant-local"),
        "alias": settings.source(name).qdrant_collection,
        "vector": vector,
        "k": 5,
        "ef_search": settings.source(name).pgvector.hnsw.ef_search,
    }
    done = subprocess.run(
        [str(READERS), str(SCRIPT)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    clients = json.loads(done.stdout)
    expected = {
        backend: [(h["id"], h["text"], h["metadata"]) for h in hits]
        for backend, hits in ours.items()
    }
    for client, hits in clients.items():
        backend = "pgvector" if client.endswith("postgres") else "qdrant"
        ids = [hit[0] for hit in hits]
        assert ids == [e[0] for e in expected[backend]], client
        assert [hit[1] for hit in hits] == [e[1] for e in expected[backend]], client
        for (_, _, metadata), (_, _, ours_metadata) in zip(hits, expected[backend], strict=True):
            # Each client adds keys of its own (langchain-qdrant: _id, _collection_name).
            assert ours_metadata.items() <= metadata.items(), (client, metadata)
    assert expected["pgvector"] == expected["qdrant"]
    assert expected["pgvector"][0][2]["category"] == "astronomy"
