"""What the Dagster UI shows about a source's assets beyond their code: the source table as
an upstream asset, the sinks' table names, URIs and column schemas (Dagster's standard
`dagster/...` keys), kinds that match the embedder actually configured, and the owners,
tags and description sources.yaml gives (the description goes on the source asset)."""

import dagster as dg

from embedding_assets.config.base import split_qualified
from embedding_assets.config.embedders import EmbedderSpec, SentenceTransformersEmbedderSpec
from embedding_assets.config.sources import SourceSpec

# Kinds the UI draws an icon for, by provider.
PROVIDER_KINDS = {
    "sentence_transformers": "pytorch",
    "openai": "openai",
    "ollama": "ollama",
    "cohere": "cohere",
    "voyage": "voyage",
    "jina": "jina",
    "tei": "huggingface",
}
STAGE_TAG = "embedding_assets/stage"


def embedder_kind(embedder: EmbedderSpec) -> str:
    return PROVIDER_KINDS[embedder.provider]


def source_key(spec: SourceSpec) -> dg.AssetKey:
    return dg.AssetKey([spec.name, "source"])


def source_asset(spec: SourceSpec) -> dg.AssetSpec:
    """The source table (or query) as the graph's first node: read, never written here."""
    metadata: dict = {}
    if spec.table:
        schema, table = split_qualified(spec.table)
        metadata["dagster/table_name"] = f"{schema}.{table}"
        what = f"table {schema}.{table}"
    else:
        metadata["query"] = dg.MetadataValue.md(f"```sql\n{spec.query}\n```")
        what = "the rows of its `query:`"
    metadata.update(text_template=spec.text, id_column=spec.id_column)
    if spec.where:
        metadata["where"] = spec.where
    return dg.AssetSpec(
        key=source_key(spec),
        group_name=spec.name,
        kinds={"postgres"},
        description=(f"{spec.description}\n\n" if spec.description else "")
        + f"The source of {spec.name!r}: {what}, read by the change feed.",
        metadata=metadata,
        owners=spec.owners,
        tags=spec.tags,
    )


def declared_dimension(embedder: EmbedderSpec) -> int | None:
    """The vectors' dimension where it is known without calling a remote service."""
    if isinstance(embedder, SentenceTransformersEmbedderSpec):
        from embedding_assets.embedders.build import make_embedder

        return make_embedder(embedder).dimension  # read from the model's config files
    return getattr(embedder, "dimensions", None) or embedder.dimension


def chunk_table_schema(spec: SourceSpec, dimension: int | None) -> dg.TableSchema:
    vector = f"vector({dimension})" if dimension else "vector"
    columns = [
        dg.TableColumn("point_id", "uuid", description="uuid5 of source, row id, chunk, model"),
        dg.TableColumn("row_id", "text", description=f"the source's {spec.id_column}, as text"),
        dg.TableColumn("chunk_index", "int"),
        dg.TableColumn("shard", "int"),
        dg.TableColumn("chunk_text", "text"),
        dg.TableColumn("chunk_hash", "text", description="sha256 of the chunk text"),
        dg.TableColumn("token_count", "int"),
        dg.TableColumn("model", "text"),
        dg.TableColumn("embedding", vector),
        *(dg.TableColumn(name, "as in the source") for name in spec.metadata),
        dg.TableColumn("updated_at", "timestamptz"),
    ]
    return dg.TableSchema(columns=columns)


def sink_metadata(
    spec: SourceSpec, embedder: EmbedderSpec, qdrant_url: str | None, qdrant_path: str
) -> dict[str, dict]:
    """Definition metadata of the two sinks, by stage."""
    schema, table = spec.pg_table
    where = qdrant_url.rstrip("/") if qdrant_url else f"file://{qdrant_path}"
    embeddings: dict = {"model": embedder.model, "embedder": spec.embedder}
    if spec.pgvector.enabled:
        embeddings["dagster/table_name"] = f"{schema}.{table}"
        embeddings["dagster/column_schema"] = chunk_table_schema(spec, declared_dimension(embedder))
    if spec.write_back is not None:
        relation = ".".join(spec.write_back_table)
        embeddings["write_back"] = f"{relation}.{spec.write_back.column}"
        if not spec.pgvector.enabled:  # the column is the asset's one table
            embeddings["dagster/table_name"] = relation
    return {
        "embeddings": embeddings,
        "vector_index": {
            "dagster/uri": f"{where}/collections/{spec.qdrant_collection}",
            "qdrant_collection": spec.qdrant_collection,
            "qdrant": "server" if qdrant_url else "embedded",
        },
    }


def common_attributes(spec: SourceSpec) -> dict:
    """Owners and tags of every asset of the source."""
    return {"owners": spec.owners, "tags": dict(spec.tags)}


def staging_tags(spec: SourceSpec) -> dict[str, str]:
    return {**spec.tags, STAGE_TAG: "staging"}


# Figures of the plain steps (`sync.shard_steps`) that the UI shows typed.
_JSON_FIGURES = ("failed_row_reasons",)
_TEXT_FIGURES = ("generation",)  # a constant, not a series to plot


def dagster_metadata(figures: dict) -> dict:
    """A step's plain figures as Dagster metadata: dicts as JSON, the generation as text."""
    typed = dict(figures)
    for key in _JSON_FIGURES:
        if key in typed:
            typed[key] = dg.MetadataValue.json(typed[key])
    for key in _TEXT_FIGURES:
        if key in typed:
            typed[key] = dg.MetadataValue.text(str(typed[key]))
    return typed
