"""Runs in .venv-readers (scripts/install-readers.sh), not in the project's environment: the
clients applications use, pointed at our stores with constructor arguments only (what the
README's reader contract says to write). Reads a JSON request on stdin:

    {"pg_url", "schema", "view", "llama_view", "qdrant_path", "alias", "vector", "k",
     "ef_search"}

and prints {client: [[id, content, metadata], ...]} for the top k of each client, best first.
"""

import json
import sys

from langchain_core.embeddings import Embeddings


class GivenVector(Embeddings):
    """The query vector our embedder made: the clients compare, they do not embed."""

    def __init__(self, vector: list[float]):
        self.vector = vector

    def embed_query(self, text: str) -> list[float]:
        return self.vector

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.vector for _ in texts]


def driver_url(url: str, driver: str) -> str:
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


def langchain_postgres(request: dict) -> list:
    from langchain_postgres import PGEngine, PGVectorStore
    from langchain_postgres.v2.indexes import HNSWQueryOptions

    engine = PGEngine.from_connection_string(driver_url(request["pg_url"], "psycopg"))
    store = PGVectorStore.create_sync(
        engine=engine,
        table_name=request["view"],
        schema_name=request["schema"],
        embedding_service=GivenVector(request["vector"]),
        id_column="id",
        content_column="content",
        embedding_column="embedding",
        metadata_json_column="metadata",
        index_query_options=HNSWQueryOptions(ef_search=request["ef_search"]),
    )
    found = store.similarity_search_with_score_by_vector(request["vector"], k=request["k"])
    return [[d.id, d.page_content, d.metadata] for d, _ in found]


def llama_index_postgres(request: dict) -> list:
    from llama_index.core.vector_stores import VectorStoreQuery
    from llama_index.vector_stores.postgres import PGVectorStore

    store = PGVectorStore.from_params(
        connection_string=driver_url(request["pg_url"], "psycopg2"),
        async_connection_string=driver_url(request["pg_url"], "asyncpg"),
        schema_name=request["schema"],
        table_name=request["llama_view"],  # it reads data_<table_name>
        embed_dim=len(request["vector"]),
        perform_setup=False,
        hnsw_kwargs={"hnsw_ef_search": request["ef_search"]},
    )
    query = VectorStoreQuery(query_embedding=request["vector"], similarity_top_k=request["k"])
    result = store.query(query)
    return [[n.node_id, n.get_content(), n.metadata] for n in result.nodes]


def langchain_qdrant(request: dict, client) -> list:
    from langchain_qdrant import QdrantVectorStore

    store = QdrantVectorStore(
        client=client,
        collection_name=request["alias"],
        embedding=GivenVector(request["vector"]),
        content_payload_key="text",
        metadata_payload_key="metadata",
    )
    found = store.similarity_search_with_score_by_vector(request["vector"], k=request["k"])
    return [[d.metadata["_id"], d.page_content, d.metadata] for d, _ in found]


def llama_index_qdrant(request: dict, client) -> list:
    from llama_index.core.vector_stores import VectorStoreQuery
    from llama_index.vector_stores.qdrant import QdrantVectorStore

    store = QdrantVectorStore(client=client, collection_name=request["alias"])
    query = VectorStoreQuery(query_embedding=request["vector"], similarity_top_k=request["k"])
    result = store.query(query)
    return [[n.node_id, n.get_content(), n.metadata] for n in result.nodes]


def qdrant_client_query(request: dict, client) -> list:
    points = client.query_points(
        request["alias"], query=request["vector"], limit=request["k"], with_payload=True
    ).points
    return [[str(p.id), p.payload["text"], p.payload["metadata"]] for p in points]


def main() -> None:
    from qdrant_client import QdrantClient

    request = json.load(sys.stdin)
    client = QdrantClient(path=request["qdrant_path"])
    results = {
        "langchain_postgres": langchain_postgres(request),
        "llama_index_postgres": llama_index_postgres(request),
        "langchain_qdrant": langchain_qdrant(request, client),
        "llama_index_qdrant": llama_index_qdrant(request, client),
        "qdrant_client": qdrant_client_query(request, client),
    }
    client.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
