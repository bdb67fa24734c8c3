"""The interface between the pipeline and the places a source's vectors are kept.

Every destination is reconciled against the ledger (`state.ledger`, the table
`embedding_assets.row_state`), never against what a run produced, and is written one of two
ways:

- `TransactionalDestination` (the pgvector chunk table, the write-back column): written inside
  the ledger's transaction, so the ledger's content hash is exactly what it holds and a crash
  keeps all of a write or none of it.
- `FollowingDestination` (Qdrant, as a server or the embedded engine behind `QdrantStore`):
  written after that transaction, from what the ledger records it lacks (it keeps its own
  synced state there), so a crash between the two writes converges on the next run.

The pipeline (`sync.store`), the `vector_index` step, the audit and the IO managers reach a
destination only through these protocols and `SourceRuntime.destinations`: a new destination
is one module implementing one of them, listed there. No Dagster here.
"""

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from typing import Protocol

import sqlalchemy as sa

from embedding_assets.core.delta import EmbeddedRows, IndexUpdate, RowFailure


@dataclass(frozen=True)
class RowsToWrite:
    """One shard's batch as the ledger's transaction decided to store it."""

    batch: EmbeddedRows
    written: list[str]  # rows whose new vectors are stored (none written by a newer run since)
    removed: list[str]  # rows deleted or no longer matching `where`
    hashes: dict[str, str]  # row id -> the content hash its vectors were computed from
    model_id: str
    live: bool  # the generation is live (read under the registry's lock)

    def without(self, rows: Collection[str]) -> "RowsToWrite":
        """The same write less `rows` (refused by a destination written before): they keep
        what they had in every destination, and the error table retries them."""
        if not rows:
            return self
        return replace(self, written=[r for r in self.written if r not in rows])


@dataclass(frozen=True)
class DestinationWrite:
    """What one destination's write did: its figures for the run's metadata, in its own keys,
    and the rows whose values it refused (they stay as they were, recorded as failures)."""

    metadata: dict[str, object] = field(default_factory=dict)
    refused: dict[str, RowFailure] = field(default_factory=dict)


@dataclass(frozen=True)
class Repair:
    """What a repair marked: rows pending again (their stored state no longer counts), stray
    entries removed, and whether everything of the shard is resent."""

    rows_pending: int = 0
    removed: int = 0
    resent: bool = False


class Destination(Protocol):
    """A place that holds one source generation's vectors."""

    # How `search --backend` and the run's metadata name it: pgvector, qdrant, column.
    name: str

    def count(self, shard: int | None = None) -> int:
        """What it holds now, of one shard or all: chunks, points or row vectors."""
        ...

    def repair(self, shard: int | None, enqueue: bool) -> Repair:
        """Mark what it lost (against the ledger) so the normal path restores it; `enqueue`:
        queue those rows in the change queue too (every feed but the diff reads it)."""
        ...


class TransactionalDestination(Destination, Protocol):
    """Written in the ledger's transaction, after the rows written by newer runs are left out."""

    def prepare(self, conn: sa.Connection, dimension: int, live: bool, enqueue: bool) -> None:
        """Make what a write of `dimension`-d vectors needs, if missing; called in a short
        transaction of its own before the write, and again inside the write's."""
        ...

    def refusals(self, conn: sa.Connection, rows: RowsToWrite) -> dict[str, RowFailure]:
        """Before any destination writes: the rows this one will not be allowed to store
        (row-level security), so no destination stores them and the ledger keeps them
        pending, each recorded as a failure. Changes nothing."""
        ...

    def write(self, conn: sa.Connection, rows: RowsToWrite) -> DestinationWrite:
        """Store the written rows' vectors and clear the removed rows', in `conn`'s
        transaction (the ledger's)."""
        ...

    def build_index(self, live: bool, work_left: Callable[[], bool]) -> DestinationWrite:
        """After a write with no backlog: build the search index a bulk load deferred, once
        `work_left()` says no shard has work. Figures of what it did."""
        ...

    def static_metadata(self) -> dict[str, object]:
        """What every write's metadata says of it (its table)."""
        ...


class FollowingDestination(Destination, Protocol):
    """Written after the ledger's transaction, from what the ledger records it lacks."""

    def plan(
        self, shard: int, dimension: int, limit: int, model_id: str
    ) -> tuple[IndexUpdate, object]:
        """What must change so the shard equals what the ledger and the chunk table hold.
        Reads only. Returns the update and the planning's figures."""
        ...

    def apply(self, update: IndexUpdate) -> None:
        """Apply the update, then record in the ledger what the destination now holds."""
        ...
