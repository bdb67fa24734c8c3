"""The embedded engine's files: a collection made (beside its place, then renamed) with its
payload indexes and, for hybrid search, the sparse `lexical` vector; and a made one's
vector config checked against the model's dimension."""

import json
import shutil
from pathlib import Path

import qdrant_edge as edge

from embedding_assets.destinations.qdrant_lexical import LEXICAL_VECTOR
from embedding_assets.destinations.qdrant_store import PAYLOAD_INDEXES, mismatch_error

CONFIG_FILE = "edge_config.json"  # written by qdrant-edge at create; holds size and distance


def create_shard(path: Path, dimension: int, lexical: bool = False) -> None:
    # Build beside the target and rename, so a crash never leaves a half-made collection
    # that collection_exists() would report.
    tmp = path.with_name(f".{path.name}.creating")
    shutil.rmtree(tmp, ignore_errors=True)
    sparse = {LEXICAL_VECTOR: edge.EdgeSparseVectorParams(modifier=edge.Modifier.Idf)}
    config = edge.EdgeConfig(
        vectors=edge.EdgeVectorParams(size=dimension, distance=edge.Distance.Cosine),
        sparse_vectors=sparse if lexical else None,
    )
    shard = edge.EdgeShard.create(str(tmp), config)
    try:
        schemas = {
            "keyword": edge.PayloadSchemaType.Keyword,
            "integer": edge.PayloadSchemaType.Integer,
        }
        for field, kind in PAYLOAD_INDEXES.items():
            shard.update(edge.UpdateOperation.create_field_index(field, schemas[kind]))
        shard.flush()
    finally:
        shard.close()
    tmp.rename(path)


def check_shard_config(name: str, path: Path, dimension: int) -> None:
    try:
        stored = json.loads((path / CONFIG_FILE).read_text())["vectors"][""]
        size, distance = int(stored["size"]), str(stored["distance"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(
            f"cannot read the vector config of embedded Qdrant collection {name!r} "
            f"from {path / CONFIG_FILE}: {exc}"
        ) from exc
    if size != dimension or distance.lower() != "cosine":
        raise mismatch_error(
            name, f"{size}-dimensional {distance} vectors", dimension, f"remove {path}"
        )
