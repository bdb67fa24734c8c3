"""`embedding_assets.EmbeddingSync`: one source as a Dagster component. Its `defs.yaml`
attributes are an entry of sources.yaml, field for field and validated the same way
(`config.components.EmbeddingSyncAttributes`, whose JSON schema editors get), with an
optional `embedders:` of its own; it produces exactly the assets, checks, jobs, sensors and
schedules that entry produces.

In this project the defs folder is read by `load_settings` beside sources.yaml (one loader,
two front doors), so `embedding-assets` commands see component sources too; in a project of
its own, Dagster's loader calls `build_defs` (`definitions.component_definitions`).
"""

from pathlib import Path

import dagster as dg
from pydantic import BaseModel

from embedding_assets.config.components import (
    COMPONENT_TYPE,
    EmbeddingSyncAttributes,
    parse_attributes,
)
from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec


class EmbeddingSyncScaffolder(dg.Scaffolder):
    """`dg scaffold defs embedding_assets.EmbeddingSync <name>`: a defs.yaml for a source of
    that name, with the fields a new source needs and the others at their defaults."""

    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        name = Path(request.target_path).name.replace("-", "_")
        dg.scaffold_component(
            request,
            {
                "name": name,
                "table": f"public.{name}",
                "id_column": "id",
                "text": "{title}: {body}",
                "embedder": "local",
            },
        )


@dg.scaffold_with(EmbeddingSyncScaffolder)
class EmbeddingSync(dg.Component):
    """Keeps the embeddings of one PostgreSQL table (or query) in sync in pgvector and Qdrant:
    the source's `pending_rows`, `chunks`, `embeddings` and `vector_index` assets, partitioned
    by shard, with their checks, the sync job, the changes and lag sensors and the reconcile
    schedule. Attributes: the fields of an entry of sources.yaml (name, table or query,
    id_column, text, embedder, metadata, where, chunking, pgvector, qdrant, hybrid, ...), and
    `embedders:` for embedders sources.yaml does not declare. `{{ env.NAME }}` in a string
    reads an environment variable."""

    def __init__(self, source: SourceSpec, embedders: dict[str, EmbedderSpec] | None = None):
        self.source = source
        self.embedders = embedders or {}

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return EmbeddingSyncAttributes

    @classmethod
    def load(
        cls, attributes: BaseModel | None, context: dg.ComponentLoadContext
    ) -> "EmbeddingSync":
        if attributes is None:
            raise ValueError(f"{context.path}: an {COMPONENT_TYPE} needs attributes (a source)")
        # Validated once already, as written; again with {{ env.NAME }} rendered.
        raw = attributes.model_dump(mode="json", exclude_unset=True)
        parsed = parse_attributes(raw, Path(context.path) / "defs.yaml")
        return cls(parsed.source(), parsed.embedders)

    def build_defs(self, context: dg.ComponentLoadContext) -> dg.Definitions:
        from embedding_assets.definitions import component_definitions

        return component_definitions(self.source, self.embedders)
