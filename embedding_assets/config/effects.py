"""What an edit of each key of sources.yaml does to a store already built, in one table.

Every key of a source and of an embedder has exactly one effect (a unit test walks the
models, so a new key without one fails):

- `reembed`: shapes the vectors. A new generation is built beside the live one and
  promoted once complete (`sync.generations`).
- `eligibility`: changes which rows are eligible. The next sync or sensor tick runs the
  full diff of the source once: rows that left are deleted from every sink, rows that
  entered are embedded, rows that stayed cost nothing.
- `in_place`: changes what is stored beside the vectors (metadata, payloads, indexes,
  the write-back column, the readers' names). Applied by the next sync with no embedder
  call: rows rewritten from their stored vectors, columns added, indexes rebuilt.
- `reshard`: `shards`. The ledger, the queue and the chunk table are re-sharded in one
  transaction at the next write; nothing is embedded again (`SourceRuntime.ensure_target`).
- `operational`: how and when work runs (endpoints, keys, limits, retries, schedules,
  owners). Nothing stored changes.
- `identity`: `name`. Another name is another source: the old one's triggers, queue and
  generations are reported by `status` and removed only by `embedding-assets prune`.

The configuration a store was last brought in line with is recorded per generation
(`state.applied_config`) as the values of its `eligibility` and `in_place` keys, so an
edit is noticed by whoever starts next, and named.
"""

import hashlib
import json
from enum import StrEnum
from typing import Any

from pydantic import BaseModel


class Effect(StrEnum):
    REEMBED = "reembed"
    ELIGIBILITY = "eligibility"
    IN_PLACE = "in_place"
    RESHARD = "reshard"
    OPERATIONAL = "operational"
    IDENTITY = "identity"


REEMBED, ELIGIBILITY, IN_PLACE, RESHARD, OPERATIONAL, IDENTITY = (
    Effect.REEMBED,
    Effect.ELIGIBILITY,
    Effect.IN_PLACE,
    Effect.RESHARD,
    Effect.OPERATIONAL,
    Effect.IDENTITY,
)

# Keys of a source, dotted for nested sections.
SOURCE_KEYS: dict[str, Effect] = {
    "name": IDENTITY,
    "table": ELIGIBILITY,
    "query": ELIGIBILITY,
    "id_column": ELIGIBILITY,
    "where": ELIGIBILITY,
    "text": REEMBED,
    "embedder": REEMBED,  # a model of its own, else nothing (generations key on the model)
    "chunking.max_tokens": REEMBED,
    "chunking.overlap": REEMBED,
    "metadata": IN_PLACE,
    "shards": RESHARD,
    "pgvector.enabled": IN_PLACE,
    "pgvector.table": IN_PLACE,  # the readers' view moves; the generation's own table stays
    "pgvector.hnsw.m": IN_PLACE,
    "pgvector.hnsw.ef_construction": IN_PLACE,
    "pgvector.hnsw.ef_search": OPERATIONAL,  # read by every search
    "pgvector.hnsw.iterative_scan": OPERATIONAL,
    "qdrant.enabled": IN_PLACE,
    "qdrant.collection": IN_PLACE,  # the readers' alias moves (a server)
    "qdrant.hnsw.m": IN_PLACE,
    "qdrant.hnsw.ef_construct": IN_PLACE,
    "qdrant.hnsw.ef_search": OPERATIONAL,
    "qdrant.quantization": IN_PLACE,
    # The chunk table's full-text column added, dropped or computed again in Postgres. With
    # Qdrant on, the collection's sparse vector is part of the pipeline instead: a collection
    # without it, or with terms of another language, is built again as a new generation
    # (vectors copied by chunk hash, nothing embedded: `sync.generations.serves_as_is`).
    "hybrid.enabled": IN_PLACE,
    "hybrid.language": IN_PLACE,
    "hybrid.lexical_weight": OPERATIONAL,  # read by every hybrid search
    "write_back": IN_PLACE,
    "write_back.column": IN_PLACE,
    "write_back.table": IN_PLACE,
    "write_back.model_column": IN_PLACE,
    "write_back.embedded_at_column": IN_PLACE,
    "write_back.row_vector": IN_PLACE,
    "write_back.index": IN_PLACE,
    "max_rows_per_run": OPERATIONAL,
    "sensor_interval_seconds": OPERATIONAL,
    "sensor_status": OPERATIONAL,
    "change_capture": OPERATIONAL,  # a new feed seeds itself from one full diff
    "watermark_column": OPERATIONAL,
    "live": OPERATIONAL,
    "watermark_overlap_seconds": OPERATIONAL,
    "reconcile.cron": OPERATIONAL,
    "reconcile.timezone": OPERATIONAL,
    "retries.max_attempts": OPERATIONAL,
    "retries.first_wait_seconds": OPERATIONAL,
    "retries.max_wait_seconds": OPERATIONAL,
    "generations.promote": OPERATIONAL,
    "generations.keep_previous_hours": OPERATIONAL,
    "generations.evaluate": OPERATIONAL,  # the quality gate before a promotion
    "generations.evaluate.queries": OPERATIONAL,
    "generations.evaluate.metric": OPERATIONAL,
    "generations.evaluate.max_drop": OPERATIONAL,
    "freshness_seconds": OPERATIONAL,
    "description": OPERATIONAL,
    "owners": OPERATIONAL,
    "tags": OPERATIONAL,
}

# Keys of an embedder, whatever its provider.
EMBEDDER_KEYS: dict[str, Effect] = {
    "provider": REEMBED,
    "model": REEMBED,
    "dimensions": REEMBED,  # the output size requested from the API
    "precision": REEMBED,  # bfloat16 vectors carry their own model id
    "tokenizer": REEMBED,  # cuts the chunks
    "device": OPERATIONAL,
    "dimension": OPERATIONAL,  # declares the size instead of a probe call; requests nothing
    "encoding_format": OPERATIONAL,  # the same floats, another wire format
    "batch_size": OPERATIONAL,
    "max_batch_tokens": OPERATIONAL,
    "max_concurrent_runs": OPERATIONAL,
    "price_per_million_tokens": OPERATIONAL,
    "max_tokens_per_day": OPERATIONAL,
    "base_urls": OPERATIONAL,
    "api_key_env": OPERATIONAL,
    "max_inputs_per_request": OPERATIONAL,
    "max_tokens_per_request": OPERATIONAL,
    "max_input_tokens": OPERATIONAL,
    "requests_per_second": OPERATIONAL,
    "tokens_per_minute": OPERATIONAL,
    "timeout_seconds": OPERATIONAL,
    "max_attempts": OPERATIONAL,
    "batch_deadline_seconds": OPERATIONAL,
    "concurrency": OPERATIONAL,
}

# Not keys of sources.yaml but of the database, recorded and compared the same way: a change
# of row-level security (on, off, a policy) on the source table changes the rows the tool's
# role sees, so it is an eligibility edit.
DATABASE_KEYS: dict[str, Effect] = {"database.row_level_security": ELIGIBILITY}

# An edit of these changes which rows the ledger must hold, or what they hold beside their
# vectors: both are recorded, and brought in line by one full diff.
RECORDED = (Effect.ELIGIBILITY, Effect.IN_PLACE)


def model_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of a pydantic model, dotted, nested sections expanded (a section that may
    be null, like write_back, is a key of its own too)."""
    keys = []
    for name, field in model.model_fields.items():
        nested = _nested_model(field.annotation)
        if nested is None:
            keys.append(prefix + name)
            continue
        if field.default is None:
            keys.append(prefix + name)
        keys.extend(model_keys(nested, f"{prefix}{name}."))
    return keys


def _nested_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _value(spec: BaseModel, key: str) -> Any:
    value: Any = spec.model_dump(mode="json")
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def recorded_config(spec: BaseModel) -> dict[str, Any]:
    """The values of a source's keys whose edit needs the store brought in line."""
    return {
        key: _value(spec, key)
        for key, effect in SOURCE_KEYS.items()
        if effect in RECORDED and key != "write_back"
    }


def fingerprint(config: dict[str, Any], effect: Effect) -> str:
    """A stable hash of the recorded values of one effect's keys."""
    picked = {k: v for k, v in config.items() if {**SOURCE_KEYS, **DATABASE_KEYS}.get(k) == effect}
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(applied: dict[str, Any], current: dict[str, Any]) -> dict[str, Effect]:
    """Keys whose value differs between the applied and the current configuration, with
    their effect, in the table's order."""
    every = {**SOURCE_KEYS, **DATABASE_KEYS}
    return {key: every[key] for key in every if key in current and applied.get(key) != current[key]}
