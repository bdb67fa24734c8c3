"""embedding_assets: keeps vector embeddings of PostgreSQL rows in sync in pgvector and Qdrant,
as a Dagster code location. `embedding_assets.EmbeddingSync` is its Dagster component (loaded on
first use: importing the package stays light for the CLI)."""


def __getattr__(name: str):
    if name == "EmbeddingSync":
        from embedding_assets.defs.component import EmbeddingSync

        return EmbeddingSync
    raise AttributeError(f"module 'embedding_assets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return [*globals(), "EmbeddingSync"]
