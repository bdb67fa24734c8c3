"""Pydantic specs for sources.yaml and its loader.

A sources file declares embedders (how to turn text into vectors) and sources (which rows
of which table or query to keep embedded, and where the vectors go).
"""

import os
import re
import string
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from embedding_assets.core.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS

BUNDLED_SOURCES = Path(__file__).parent / "data" / "sources.yaml"
SOURCES_ENV = "EMBEDDING_ASSETS_SOURCES"

# Columns the pgvector table uses for itself; metadata columns may not reuse them.
RESERVED_COLUMNS = frozenset(
    {
        "point_id",
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
# Qdrant refuses collection names with these characters (its storage uses them as paths).
QDRANT_NAME_FORBIDDEN = re.compile(r"[/\\\x00<>:\"|?*]")


class _Spec(BaseModel):
    # A typo in sources.yaml must fail loudly, not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class _EmbedderSpecBase(_Spec):
    # Runs calling one embedder at once (a Dagster pool per embedder bounds them).
    max_concurrent_runs: int = Field(default=2, ge=1)
    # What `embedding-assets plan` multiplies tokens by (a remote provider's list price).
    price_per_million_tokens: float | None = Field(default=None, ge=0)
    # Tokens sent to this embedder per UTC day; once spent, runs take no new rows until
    # the next day (rows wait, nothing fails). None: no budget.
    max_tokens_per_day: int | None = Field(default=None, ge=1)


class SentenceTransformersEmbedderSpec(_EmbedderSpecBase):
    """A local sentence-transformers model, loaded offline in the run's process."""

    provider: Literal["sentence_transformers"]
    model: str = "all-MiniLM-L6-v2"
    device: str | None = None
    # A batch holds at most batch_size texts and max_batch_tokens tokens once padded.
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, le=4096)
    max_batch_tokens: int = Field(default=DEFAULT_MAX_BATCH_TOKENS, ge=1)
    # bfloat16: ~2x on CPUs with avx512_bf16/AMX; its vectors get their own model id.
    precision: Literal["float32", "bfloat16"] = "float32"


class RemoteEmbedderSpec(_EmbedderSpecBase):
    """An embedding service reached over HTTP. Limits default to the provider's documented
    ones; the API key is read from the environment variable named by `api_key_env`."""

    model: str
    base_urls: tuple[str, ...] = Field(min_length=1)  # tuple: specs are hashable cache keys
    api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    dimension: int | None = Field(default=None, ge=1)  # else one probe call
    max_inputs_per_request: int | None = Field(default=None, ge=1)
    max_tokens_per_request: int | None = Field(default=None, ge=1)
    max_input_tokens: int | None = Field(default=None, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    timeout_seconds: float = Field(default=60, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    batch_deadline_seconds: float = Field(default=300, gt=0)
    concurrency: int = Field(default=4, ge=1)
    tokenizer: str | None = None  # "hf:<tokenizer.json>", "tiktoken:<encoding>" or "estimate"

    @field_validator("base_urls")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not re.match(r"^https?://[^/\s]+", url):
                raise ValueError(f"base_urls entry {url!r} is not an http(s) URL")
        return tuple(url.rstrip("/") for url in value)


class OpenAIEmbedderSpec(RemoteEmbedderSpec):
    """Any OpenAI-compatible /v1/embeddings: OpenAI, Together, vLLM, TEI, Infinity, LiteLLM,
    Ollama's /v1, or `embedding-assets serve`."""

    provider: Literal["openai"]
    dimensions: int | None = Field(default=None, ge=1)  # the API's `dimensions` parameter
    encoding_format: Literal["float", "base64"] = "float"


class OllamaEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["ollama"]


class CohereEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["cohere"]


class VoyageEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["voyage"]
    dimensions: int | None = Field(default=None, ge=1)  # Voyage's `output_dimension`


class JinaEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["jina"]
    dimensions: int | None = Field(default=None, ge=1)


class TEIEmbedderSpec(RemoteEmbedderSpec):
    provider: Literal["tei"]


EmbedderSpec = Annotated[
    SentenceTransformersEmbedderSpec
    | OpenAIEmbedderSpec
    | OllamaEmbedderSpec
    | CohereEmbedderSpec
    | VoyageEmbedderSpec
    | JinaEmbedderSpec
    | TEIEmbedderSpec,
    Field(discriminator="provider"),
]


class ChunkingSpec(_Spec):
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


class PgvectorHnswSpec(_Spec):
    """pgvector's HNSW index. `m` and `ef_construction` apply when the index is built (a
    bulk load builds it once; drop it to rebuild with new values); `ef_search` is the
    candidate list of every search (pgvector's default, 40, misses exact matches among
    many near-duplicates); `iterative_scan` (pgvector >= 0.8) keeps scanning when a filter
    (a shard) removes candidates."""

    m: int = Field(default=16, ge=2, le=100)
    ef_construction: int = Field(default=64, ge=4, le=1000)
    ef_search: int = Field(default=200, ge=1, le=1000)
    iterative_scan: Literal["off", "relaxed_order", "strict_order"] = "relaxed_order"

    @model_validator(mode="after")
    def _ef_construction_covers_m(self) -> "PgvectorHnswSpec":
        if self.ef_construction < 2 * self.m:
            raise ValueError(
                f"pgvector.hnsw.ef_construction ({self.ef_construction}) must be at least "
                f"2 * m ({2 * self.m}), as pgvector requires; raise it or lower m"
            )
        return self


def _off_as_disabled(value):
    """`pgvector: false` / `qdrant: false` in sources.yaml: the destination is off."""
    return {"enabled": False} if value is False else value


class PgvectorSpec(_Spec):
    # false: no chunk table (a column-only source, see write_back).
    enabled: bool = True
    table: str | None = None
    hnsw: PgvectorHnswSpec = PgvectorHnswSpec()

    _off = model_validator(mode="before")(_off_as_disabled)


class WriteBackSpec(_Spec):
    """One vector per row in a `vector(d)` column: of the source table itself, or of a 1:1
    side table keyed by the row's id (`table:`) for a source table this role may not alter."""

    column: str = Field(min_length=1, max_length=50)
    table: str | None = None
    model_column: str | None = Field(default=None, min_length=1, max_length=50)
    embedded_at_column: str | None = Field(default=None, min_length=1, max_length=50)
    # A row of several chunks: the mean of their vectors, renormalised, or the first's.
    row_vector: Literal["mean", "first_chunk"] = "mean"
    # hnsw: an index (cosine) on the column, built CONCURRENTLY once a bulk load is done.
    index: Literal["none", "hnsw"] = "none"

    @property
    def columns(self) -> list[str]:
        """The columns written: vector first, then the optional model and time columns."""
        return [c for c in (self.column, self.model_column, self.embedded_at_column) if c]

    @model_validator(mode="after")
    def _distinct_columns(self) -> "WriteBackSpec":
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"write_back names a column twice: {self.columns}")
        if self.table is not None:
            split_qualified(self.table)
        return self


class QdrantHnswSpec(_Spec):
    """A Qdrant server's HNSW index, set when the collection is created; `ef_search` is
    each search's `hnsw_ef`. Qdrant's embedded engine always searches exactly."""

    m: int = Field(default=16, ge=0, le=100)
    ef_construct: int = Field(default=100, ge=4, le=1000)
    ef_search: int = Field(default=128, ge=1, le=10000)


class QdrantSpec(_Spec):
    # false: no Qdrant collection (pgvector and/or the write-back column only).
    enabled: bool = True
    collection: str | None = None
    hnsw: QdrantHnswSpec = QdrantHnswSpec()
    # scalar: int8 vectors in RAM (4x smaller), searched with rescoring by the originals.
    quantization: Literal["none", "scalar"] = "none"

    _off = model_validator(mode="before")(_off_as_disabled)

    @field_validator("collection")
    @classmethod
    def _valid_collection_name(cls, value: str | None) -> str | None:
        if value is not None and (
            not value.strip()
            or len(value) > 255
            or value in (".", "..")
            or QDRANT_NAME_FORBIDDEN.search(value)
        ):
            raise ValueError(
                f"qdrant.collection {value!r} is not a valid Qdrant collection name: use 1-255 "
                'characters without / \\ : * ? " < > | or NUL (e.g. docs_chunks)'
            )
        return value


def template_fields(template: str) -> list[str]:
    """The column names a `{column}` text template uses, in order of first use."""
    fields: list[str] = []
    for _, field, spec, conversion in string.Formatter().parse(template):
        if field is None:
            continue
        if not field.strip() or field.isdigit() or spec or conversion:
            raise ValueError(
                f"text template field {{{field}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a plain column name; write {{column}}, "
                "and for a column whose name is a number or holds ':' or '!' alias it in a "
                "`query:` "
                '(SELECT "odd:name" AS odd_name ...)'
            )
        if field not in fields:
            fields.append(field)
    if not fields:
        raise ValueError(f"text template {template!r} uses no column; write e.g. '{{title}}'")
    return fields


def split_qualified(name: str, default_schema: str = "public") -> tuple[str, str]:
    parts = name.split(".")
    if len(parts) == 1:
        return default_schema, parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise ValueError(f"{name!r} is not a table name; write table or schema.table")


class ReconcileSpec(_Spec):
    """The scheduled full diff that catches what a change feed missed (triggers disabled,
    `session_replication_role = replica`, restores, watermark deletes)."""

    cron: str | None = "0 3 * * *"  # null: no schedule (`embedding-assets reconcile` still works)
    timezone: str = "UTC"


class RetrySpec(_Spec):
    """How rows the embedder failed on are tried again: after `first_wait_seconds`, the wait
    doubling up to `max_wait_seconds`; after `max_attempts` failures of the same content the
    row is dead (not tried again until it changes or `errors replay` asks)."""

    max_attempts: int = Field(default=5, ge=1)
    first_wait_seconds: int = Field(default=60, ge=0)
    max_wait_seconds: int = Field(default=3600, ge=0)


CaptureMode = Literal["auto", "trigger", "watermark", "diff"]


class GenerationsSpec(_Spec):
    """A change of the model, template or chunking builds a new generation beside the live
    one; `promote` says whether it goes live by itself once complete and its checks pass
    (auto) or waits for `embedding-assets generations promote` (manual). The previous
    generation stays, not updated, for `keep_previous_hours` (rollback), then is dropped."""

    promote: Literal["auto", "manual"] = "auto"
    keep_previous_hours: float = Field(default=24, ge=0)


class SourceSpec(_Spec):
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


class Settings(_Spec):
    embedders: dict[str, EmbedderSpec] = Field(default_factory=dict)
    sources: list[SourceSpec]
    path: Path | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> "Settings":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        for source in self.sources:
            if source.embedder not in self.embedders:
                raise ValueError(
                    f"source {source.name!r} uses embedder {source.embedder!r}, which is not "
                    f"declared under `embedders:` (declared: {sorted(self.embedders)})"
                )
        for what, key in (
            ("pgvector table", lambda s: s.target),
            ("Qdrant collection", lambda s: s.qdrant_collection),
        ):
            owners: dict[str, list[str]] = {}
            for source in self.sources:
                owners.setdefault(key(source), []).append(source.name)
            shared = {name: users for name, users in owners.items() if len(users) > 1}
            if shared:
                name, users = next(iter(shared.items()))
                raise ValueError(
                    f"sources {users} write the same {what} {name!r}: each source keeps its "
                    f"own and removes whatever else it finds there, so give each source its "
                    f"own {what} (pgvector.table / qdrant.collection)"
                )
        return self

    def source(self, name: str) -> SourceSpec:
        for spec in self.sources:
            if spec.name == name:
                return spec
        raise KeyError(f"no source named {name!r}; sources: {[s.name for s in self.sources]}")

    def embedder_for(self, source: SourceSpec) -> EmbedderSpec:
        return self.embedders[source.embedder]


class SettingsError(ValueError):
    """sources.yaml is missing or invalid; the message names the file and the problem."""


def sources_path() -> Path:
    return Path(os.environ.get(SOURCES_ENV) or BUNDLED_SOURCES)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` in sources.yaml, so URLs and ports follow the
    environment (two copies side by side). A missing variable without default is an error."""

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise SettingsError(f"sources file uses ${{{name}}}, which is not set")
        return value

    return _ENV_REFERENCE.sub(replace, text)


def load_settings(path: Path | str | None = None) -> Settings:
    path = Path(path) if path else sources_path()
    if not path.is_file():
        raise SettingsError(f"sources file {path} does not exist; set {SOURCES_ENV} to a YAML file")
    try:
        raw = yaml.safe_load(expand_env(path.read_text())) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"{path} must hold a mapping with `embedders:` and `sources:`")
    try:
        return Settings.model_validate({**raw, "path": path.resolve()})
    except ValidationError as exc:
        raise SettingsError(f"{path} is invalid:\n{exc}") from exc
