"""pgvector values in and out: query results with vectors fetched in binary as numpy arrays,
vectors written in pgvector's text form, and the search hit a chunk table returns."""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa


@dataclass(frozen=True)
class SearchHit:
    row_id: str
    chunk_index: int
    score: float
    text: str
    point_id: str


def as_array(value: Any) -> np.ndarray:
    """A pgvector value (pgvector.Vector from the driver) as a float32 numpy array."""
    if hasattr(value, "to_numpy"):
        value = value.to_numpy()
    return np.asarray(value, dtype=np.float32)


def with_arrays(frame: pd.DataFrame) -> pd.DataFrame:
    if len(frame):
        frame["embedding"] = [as_array(v) for v in frame["embedding"]]
    return frame


def fetch_binary(
    conn: sa.Connection, query: str, params: dict[str, Any], columns: list[str]
) -> pd.DataFrame:
    """Rows with vectors fetched in binary (pgvector's binary loader is a buffer copy; the
    text form is parsed float by float). `query` uses psycopg's %(name)s placeholders."""
    cursor = conn.connection.driver_connection.cursor(binary=True)
    try:
        cursor.execute(query, params)
        frame = pd.DataFrame(cursor.fetchall(), columns=columns)
    finally:
        cursor.close()
    return with_arrays(frame)


def vector_text(vector: np.ndarray) -> str:
    """pgvector's text form; %.9g keeps every float32 exactly."""
    return _VECTOR_FORMATS.setdefault(len(vector), "[" + ",".join(["%.9g"] * len(vector)) + "]") % (
        tuple(vector.tolist())
    )


_VECTOR_FORMATS: dict[int, str] = {}
