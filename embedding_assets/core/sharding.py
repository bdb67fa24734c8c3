"""Hash shards: a row belongs to shard int(md5(row_id)[:8], 16) % shards, in Python and SQL."""

import hashlib


def shard_of(row_id: str, shards: int) -> int:
    return int(hashlib.md5(row_id.encode()).hexdigest()[:8], 16) % shards


def shard_sql(row_id_expr: str, shards: int) -> str:
    """The same function as `shard_of`, as a SQL expression over a text expression.

    The 8 hex digits are left-padded to 16 so the bit(64) -> bigint cast is never negative.
    """
    return (
        f"(('x' || lpad(substr(md5({row_id_expr}), 1, 8), 16, '0'))::bit(64)::bigint "
        f"% {int(shards)})::int"
    )


def shard_index(key: str) -> int:
    """Partition key ("03") -> shard number (3)."""
    if not key.isdigit():
        raise ValueError(f"shard key {key!r} is not a number like '03'")
    return int(key)
