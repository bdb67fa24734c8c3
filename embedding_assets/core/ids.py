"""Deterministic ids for stored vectors, so re-running a shard overwrites instead of adding."""

import uuid

# Fixed namespace: changing it would orphan every stored point.
POINT_NAMESPACE = uuid.UUID("6f1c3f0e-4d2b-5a7e-9c1d-2b8e7a4f5c90")


def point_id(source: str, row_id: str, chunk_index: int, model_id: str) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{source}\x1f{row_id}\x1f{chunk_index}\x1f{model_id}"))
