"""One source of sources.yaml: which rows of which table or query are kept embedded, how
changes are captured, chunked, retried and built into generations, and where the vectors go."""

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from embedding_assets.config.base import Spec, split_qualified, template_fields
from embedding_assets.config.destinations import (
    HybridSpec,
    PgvectorSpec,
    QdrantSpec,
    WriteBackSpec,
)

# Columns the pgvector table uses for itself; metadata columns may not reuse them.
RESERVED_COLUMNS = frozenset(
    {
        "point_id",
        "lexical",
        "row_id",
        "shard",
        "chunk_index",
        "chunk_text",
        "chunk_hash",
        "token_count",
        "model",
        "embedding",
        "updated_at",
        "text",  # a key of the Qdrant payload (the chunk's text)
    }
)


class ChunkingSpec(Spec):
    max_tokens: int = Field(default=256, ge=8)
    overlap: int = Field(default=32, ge=0)

    @model_validator(mode="after")
    def _overlap_below_max(self) -> "ChunkingSpec":
        if self.overlap >= self.max_tokens:
            raise ValueError(
                f"chunking.overlap ({self.overlap}) must be smaller than chunking.max_tokens "
                f"({self.max_tokens}); lower the overlap"
            )
        return self


class ReconcileSpec(Spec):
    """The scheduled full diff that catches what a change feed missed (triggers disabled,
    `session_replication_role = replica`, restores, watermark deletes)."""

    cron: str | None = "0 3 * * *"  # null: no schedule (`embedding-assets reconcile` still works)
    timezone: str = "UTC"


class RetrySpec(Spec):
    """How rows the embedder failed on are tried again: after `first_wait_seconds`, the wait
    doubling up to `max_wait_seconds`; after `max_attempts` failures of the same content the
    row is dead (not tried again until it changes or `errors replay` asks)."""

    max_attempts: int = Field(default=5, ge=1)
    first_wait_seconds: int = Field(default=60, ge=0)
    max_wait_seconds: int = Field(default=3600, ge=0)


CaptureMode = Literal["auto", "trigger", "watermark", "diff"]


class QualityGateSpec(Spec):
    """Before a build goes live, its retrieval on labelled queries (`queries`: JSON lines of
    `{"query", "relevant": [row ids]}`, relative to sources.yaml) is compared with the live
    generation's, in the mode readers get (hybrid where it exists); a drop of `metric`
    beyond `max_drop` blocks the promotion, with both figures in the reason."""

    queries: str = Field(min_length=1)
    metric: str = Field(default="ndcg_at_10", pattern=r"^(recall|mrr|ndcg)_at_[1-9][0-9]{0,2}$")
    max_drop: float = Field(default=0.02, ge=0, le=1)


class GenerationsSpec(Spec):
    """A change of the model, template or chunking builds a new generation beside the live
    one; `promote` says whether it goes live by itself once complete and its checks pass
    (auto) or waits for `embedding-assets generations promote` (manual). The previous
    generation stays, not updated, for `keep_previous_hours` (rollback), then is dropped."""

    promote: Literal["auto", "manual"] = "auto"
    keep_previous_hours: float = Field(default=24, ge=0)
    evaluate: QualityGateSpec | None = None


class SourceSpec(Spec):
    """One table (or query) whose rows are kept embedded."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")
    table: str | None = None
    query: str | None = None
    id_column: str = "id"
    text: str
    where: str | None = None
    metadata: list[str] = Field(default_factory=list)
    embedder: str = "local"
    shards: int = Field(default=8, ge=1, le=256)
    max_rows_per_run: int = Field(default=20_000, ge=1)
    # Short: a tick with the trigger feed costs a few indexed queries, and it bounds freshness.
    sensor_interval_seconds: int = Field(default=2, ge=1)
    # The changes sensor's status until someone toggles it (Dagster keeps the toggle).
    sensor_status: Literal["running", "stopped"] = "running"
    # auto: triggers for `table:` sources when this role may create them, else diff.
    change_capture: CaptureMode = "auto"
    watermark_column: str | None = None
    # The live lane (`embedding-assets live`) writes changes within about a second. Unset:
    # on where capture triggers notify it; false: the sensor's runs only.
    live: bool | None = None
    # Rows committed late with an older watermark value are still found within this window.
    watermark_overlap_seconds: int = Field(default=60, ge=0)
    reconcile: ReconcileSpec = ReconcileSpec()
    retries: RetrySpec = RetrySpec()
    generations: GenerationsSpec = GenerationsSpec()
    # A shard whose oldest pending change has waited longer is shown late in the UI.
    freshness_seconds: int = Field(default=60, ge=1)
    # Shown on the source's assets in the UI, as dbt and Sling integrations do.
    description: str | None = None
    owners: list[str] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    chunking: ChunkingSpec = ChunkingSpec()
    pgvector: PgvectorSpec = PgvectorSpec()
    qdrant: QdrantSpec = QdrantSpec()
    # Lexical (full-text) search beside the dense one; `hybrid: false` for dense only.
    hybrid: HybridSpec = HybridSpec()
    write_back: WriteBackSpec | None = None

    @field_validator("text")
    @classmethod
    def _template_is_valid(cls, value: str) -> str:
        template_fields(value)
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_columns_free(cls, value: list[str]) -> list[str]:
        clash = sorted(RESERVED_COLUMNS.intersection(value))
        if clash:
            raise ValueError(
                f"metadata columns {clash} clash with columns the pgvector table uses itself; "
                "alias them in a `query:` (e.g. SELECT model AS model_name ...)"
            )
        if len(set(value)) != len(value):
            raise ValueError(f"metadata lists a column twice: {value}")
        return value

    @model_validator(mode="after")
    def _table_or_query(self) -> "SourceSpec":
        if (self.table is None) == (self.query is None):
            raise ValueError(f"source {self.name!r}: give exactly one of `table:` or `query:`")
        if self.table is not None:
            split_qualified(self.table)
        if self.change_capture == "trigger" and self.table is None:
            raise ValueError(
                f"source {self.name!r}: change_capture: trigger needs a `table:` source; a "
                "`query:` source uses diff (or watermark, with watermark_column)"
            )
        if self.write_back is not None:
            self._check_write_back(self.write_back)
        if not self.pgvector.enabled and (self.qdrant.enabled or self.write_back is None):
            raise ValueError(
                f"source {self.name!r}: pgvector: false leaves only the write-back column, so "
                "it needs `qdrant: false` (Qdrant is restored from the chunk table) and a "
                "`write_back: {column: ...}`"
            )
        if self.live and (self.table is None or self.change_capture in ("watermark", "diff")):
            raise ValueError(
                f"source {self.name!r}: live: true needs capture triggers to notify the live "
                "lane: a `table:` source with change_capture: trigger (or auto). Watermark and "
                "diff sources stay on the sensor: remove `live:`"
            )
        if self.qdrant.enabled and self.hybrid.enabled:
            # Qdrant's terms are ours to compute: a language its BM25 lacks is known now.
            from embedding_assets.destinations.qdrant_lexical import check_language

            check_language(self.hybrid.language)
        if (self.change_capture == "watermark") != (self.watermark_column is not None):
            raise ValueError(
                f"source {self.name!r}: change_capture: watermark and watermark_column go "
                "together (e.g. change_capture: watermark, watermark_column: updated_at)"
            )
        return self

    def _check_write_back(self, write_back: WriteBackSpec) -> None:
        if write_back.table is None and self.table is None:
            raise ValueError(
                f"source {self.name!r}: write_back into the source needs a `table:` source; "
                "for a `query:` source give write_back.table, a side table keyed by the id"
            )
        read = {self.id_column, *self.text_columns, *self.metadata, self.watermark_column}
        from_where = set(
            re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", re.sub(r"'(?:[^']|'')*'", "", self.where or ""))
        )
        clash = sorted(
            c
            for c in write_back.columns
            if c in read or (write_back.table is None and c in from_where)
        )
        if clash:
            raise ValueError(
                f"source {self.name!r}: write_back columns {clash} are also read by the source "
                "(id, text, metadata, watermark or where): writing them would change the rows "
                "it embeds. Give the vector its own column"
            )

    @property
    def text_columns(self) -> list[str]:
        return template_fields(self.text)

    @property
    def write_back_table(self) -> tuple[str, str]:
        """(schema, table) the write-back columns live in: the side table, else the source."""
        assert self.write_back is not None
        return split_qualified(self.write_back.table or self.table or "")

    @property
    def pg_table(self) -> tuple[str, str]:
        """(schema, table) of the pgvector table: configured, else <schema>.<name>_embeddings."""
        if self.pgvector.table:
            return split_qualified(self.pgvector.table)
        schema = split_qualified(self.table)[0] if self.table else "public"
        return schema, f"{self.name}_embeddings"

    @property
    def target(self) -> str:
        """Stable key of the pgvector table that identifies this source's stored state."""
        schema, table = self.pg_table
        return f"{schema}.{table}"

    @property
    def qdrant_collection(self) -> str:
        return self.qdrant.collection or self.name

    @property
    def shard_keys(self) -> list[str]:
        width = max(2, len(str(self.shards - 1)))
        return [str(i).zfill(width) for i in range(self.shards)]
