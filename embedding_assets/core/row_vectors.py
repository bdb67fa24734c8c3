"""One vector per row from its chunks' vectors, for the write-back column.

- `mean` (the default): the mean of the row's chunk vectors, renormalised to unit length, so
  a long row is found by what all of it says and cosine and inner product still agree.
- `first_chunk`: the first chunk's vector (its opening: a title, a summary).

A row with no chunks (empty text) has no vector: NULL in the column.
"""

from collections.abc import Sequence
from typing import Literal

import numpy as np

RowVectorRule = Literal["mean", "first_chunk"]


def row_vectors(
    row_ids: Sequence[str],
    chunk_indexes: Sequence[int],
    vectors: np.ndarray,
    rule: RowVectorRule = "mean",
) -> dict[str, np.ndarray]:
    """{row id: its vector} from chunk rows (row id, chunk index, vector), in any order."""
    positions: dict[str, list[int]] = {}
    for position, row_id in enumerate(row_ids):
        positions.setdefault(row_id, []).append(position)
    result: dict[str, np.ndarray] = {}
    for row_id, rows in positions.items():
        if rule == "first_chunk":
            first = min(rows, key=lambda p: chunk_indexes[p])
            result[row_id] = np.asarray(vectors[first], dtype=np.float32)
            continue
        mean = np.asarray(vectors[rows], dtype=np.float64).mean(axis=0)
        norm = np.linalg.norm(mean)
        # Opposite chunks can cancel out; their mean then has no direction to keep.
        result[row_id] = (mean / norm if norm > 0 else mean).astype(np.float32)
    return result
