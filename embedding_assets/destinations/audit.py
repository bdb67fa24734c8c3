"""Every destination checked against the ledger, per shard, and what is missing repaired.

The ledger says, per row, how many chunks pgvector holds (`chunk_count`) and how many points
Qdrant holds (`qdrant_chunk_count`). A destination that lost data (a TRUNCATE, rows deleted
by hand, a removed Qdrant store, a restore from an old backup) disagrees with those counts:

- pgvector: rows whose stored chunk count differs from the ledger's are marked lost (their
  ledger version no longer matches, so they are pending again and no count reports them
  as embedded) and queued. The next run restores them with the vectors Qdrant still holds
  for the same text, and re-embeds only what neither destination has. Chunks of rows the
  ledger does not hold are removed.
- Qdrant: a shard whose point count differs is forgotten (every row lags), so the next run
  drops the shard's points and resends them from pgvector.

Counting is one grouped count per destination; only a shard that disagrees is looked at
row by row, under the shard's write lock, so a write that commits meanwhile is not mistaken
for a loss.
"""

from dataclasses import dataclass

import sqlalchemy as sa

from embedding_assets.state.ddl import STATE_SCHEMA


@dataclass(frozen=True)
class ShardAudit:
    shard: int
    ledger_chunks: int
    pgvector_chunks: int
    ledger_points: int
    qdrant_points: int | None  # None: not counted this time
    # deep audits: a checksum of the (row id, chunk index) pairs on each side, which tells a
    # lost chunk from a stray one even when their counts balance
    ledger_signature: int | None = None
    pgvector_signature: int | None = None
    rows_marked_lost: int = 0
    orphan_chunks_removed: int = 0
    qdrant_forgotten: bool = False

    @property
    def repaired(self) -> bool:
        """This audit found a new loss and marked it for repair."""
        return bool(self.rows_marked_lost or self.orphan_chunks_removed or self.qdrant_forgotten)

    @property
    def pgvector_consistent(self) -> bool:
        return (self.ledger_chunks, self.ledger_signature) == (
            self.pgvector_chunks,
            self.pgvector_signature,
        )

    @property
    def consistent(self) -> bool:
        pg_ok = self.pgvector_consistent
        return pg_ok and (self.qdrant_points is None or self.qdrant_points == self.ledger_points)


CHUNK_KEY = "hashtext({row} || ':' || {index})::bigint"


def ledger_counts(
    engine: sa.Engine, target: str, shard: int | None = None
) -> dict[int, tuple[int, int]]:
    """Per shard: chunks pgvector should hold, points Qdrant should hold."""
    only = "AND shard = :s" if shard is not None else ""
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"""SELECT shard, coalesce(sum(chunk_count), 0) AS chunks,
                    coalesce(sum(qdrant_chunk_count), 0) AS points
                FROM {STATE_SCHEMA}.row_state WHERE target = :t {only} GROUP BY shard"""
            ),
            {"t": target, "s": shard},
        ).fetchall()
    return {r.shard: (int(r.chunks), int(r.points)) for r in rows}


def ledger_signatures(engine: sa.Engine, target: str, shard: int | None) -> dict[int, int]:
    """Per shard: the checksum of the chunks the ledger says pgvector holds. O(chunks)."""
    only = "AND st.shard = :s" if shard is not None else ""
    key = CHUNK_KEY.format(row="st.row_id", index="i")
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"""SELECT st.shard, coalesce(sum({key}), 0) AS sig
                FROM {STATE_SCHEMA}.row_state AS st,
                     generate_series(0, st.chunk_count - 1) AS i
                WHERE st.target = :t AND NOT st.deleted {only} GROUP BY st.shard"""
            ),
            {"t": target, "s": shard},
        ).fetchall()
    return {r.shard: int(r.sig) for r in rows}


def pgvector_counts(
    runtime, shard: int | None, deep: bool
) -> tuple[dict[int, int], dict[int, int]]:
    """Per shard: the chunks pgvector holds and (deep) their checksum."""
    if not deep:
        if shard is None:
            return runtime.pgvector.chunk_counts(), {}
        return {shard: runtime.pgvector.chunk_count(shard)}, {}
    only = "WHERE shard = :s" if shard is not None else ""
    key = CHUNK_KEY.format(row="row_id", index="chunk_index")
    with runtime.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                f"""SELECT shard, count(*) AS n, coalesce(sum({key}), 0) AS sig
                FROM {runtime.pgvector.table} {only} GROUP BY shard"""
            ),
            {"s": shard},
        ).fetchall()
    return {r.shard: r.n for r in rows}, {r.shard: int(r.sig) for r in rows}


def audit_destinations(
    runtime,
    qdrant: str = "count",
    repair: bool = True,
    shard: int | None = None,
    deep: bool = False,
) -> list[ShardAudit]:
    """Compare pgvector and Qdrant with the ledger for every shard (or one) and, with
    `repair`, mark what is missing so the normal path restores it.

    `qdrant`: "count" (count the shards' points), "exists" (only whether the collection
    exists: takes no lock on an embedded store) or "skip". `deep` also compares checksums
    of the chunks' (row id, chunk index) pairs, so a lost chunk and a stray one cannot
    hide each other; it reads every chunk of pgvector and of the ledger (O(chunks))."""
    if not runtime.spec.pgvector.enabled:
        return []  # a column-only source: written with the ledger, in one transaction
    if not runtime.spec.qdrant.enabled:
        qdrant = "skip"
    shards = range(runtime.spec.shards) if shard is None else [shard]
    expected = ledger_counts(runtime.engine, runtime.target, shard)
    if not expected:
        return []  # nothing stored yet: nothing can be missing
    table_exists = runtime.pgvector.table_exists()
    if not table_exists:
        runtime.target_ready = False  # the next write creates the table again
    chunks, signatures = pgvector_counts(runtime, shard, deep) if table_exists else ({}, {})
    wanted = ledger_signatures(runtime.engine, runtime.target, shard) if deep else {}
    points = _qdrant_counts(runtime, qdrant, shards)
    audits = []
    for index in shards:
        want_chunks, want_points = expected.get(index, (0, 0))
        audit = ShardAudit(
            index,
            want_chunks,
            chunks.get(index, 0),
            want_points,
            points.get(index),
            ledger_signature=wanted.get(index, 0) if deep else None,
            pgvector_signature=signatures.get(index, 0) if deep else None,
        )
        if repair and not audit.pgvector_consistent:
            fixed = runtime.pgvector.repair(index, enqueue=runtime.feed.mode != "diff")
            audit = _with(
                audit, rows_marked_lost=fixed.rows_pending, orphan_chunks_removed=fixed.removed
            )
        if repair and audit.qdrant_points is not None and audit.qdrant_points != want_points:
            fixed = runtime.qdrant.repair(index, enqueue=False)
            audit = _with(audit, qdrant_forgotten=fixed.resent)
        audits.append(audit)
    return audits


def without_store_lock(runtime) -> str:
    """The Qdrant audit mode that takes no lock: an embedded store is only checked for
    existence (counting it waits for whichever run holds it); a server is counted."""
    return "exists" if runtime.qdrant.store_is_embedded else "count"


def _with(audit: ShardAudit, **changes) -> ShardAudit:
    return ShardAudit(**{**audit.__dict__, **changes})


def _qdrant_counts(runtime, mode: str, shards) -> dict[int, int]:
    qdrant = runtime.qdrant
    if mode == "skip":
        return {}
    if not qdrant.store.collection_exists(qdrant.collection):
        return dict.fromkeys(shards, 0)
    if mode == "exists":
        return {}
    with qdrant.store.session(qdrant.collection):
        return {shard: qdrant.count(shard) for shard in shards}
