"""Edits of sources.yaml brought into a store already built, by whoever runs next.

A generation's store records the configuration it was last brought in line with
(`state.applied_config`). The first sync, sensor tick or run after an edit compares it with
sources.yaml and, for the keys whose effect is `eligibility` or `in_place`
(`config.effects`):

- queues what one full diff finds (rows that left are deleted from every sink, rows that
  entered are embedded, rows whose metadata changed are rewritten from their stored
  vectors) in the same transaction that records the new configuration, so a crash either
  leaves the old record (the next caller does it again) or a queue that holds the work;
- moves capture triggers off a table the source no longer reads;
- rebuilds what an index edit changes (pgvector HNSW, a Qdrant server's HNSW and
  quantization), and sends every row to an edited write-back column again from its stored
  chunks.

A store with no record (new, or written before the record existed) gets one full diff
before its first record, so nothing an old edit left behind survives an upgrade.
"""

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.config.effects import Effect, changed_keys, recorded_config
from embedding_assets.destinations import reader_view
from embedding_assets.destinations.pg_relations import publish_view
from embedding_assets.state.applied_config import AppliedConfig
from embedding_assets.state.ddl import STATE_SCHEMA, ddl_lock, execute_script
from embedding_assets.state.privileges import row_security_fingerprint
from embedding_assets.state.source_sql import quote_ident, quote_table
from embedding_assets.state.triggers import drop_triggers_sql
from embedding_assets.sync.runtime import SourceRuntime

log = logging.getLogger(__name__)

RECHECK_SECONDS = 30.0


@dataclass(frozen=True)
class ConfigEdit:
    """What bringing a store in line found and did."""

    changed: dict[str, Effect] = field(default_factory=dict)
    rows_queued: int = 0
    applied: tuple[str, ...] = ()  # in-place actions taken

    def describe(self) -> str:
        keys = ", ".join(f"{k} ({v})" for k, v in self.changed.items()) or "none recorded yet"
        done = f"; {', '.join(self.applied)}" if self.applied else ""
        return f"configuration edits applied: {keys}; {self.rows_queued} rows queued{done}"


def current_config(runtime: SourceRuntime) -> dict[str, Any]:
    """The configured values of the recorded keys, as this generation applies them: the
    readers' names are the stable ones (a generation's own table and collection never move)."""
    config = recorded_config(runtime.spec)
    config["pgvector.table"] = ".".join(runtime.stable_table)
    config["qdrant.collection"] = runtime.stable_collection
    with runtime.engine.connect() as conn:
        config["database.row_level_security"] = row_security_fingerprint(conn, runtime.spec)
    return config


def pending_edits(runtime: SourceRuntime) -> dict[str, Effect] | None:
    """Read only: the keys edited since the store was last brought in line ({} when none),
    None when nothing was recorded yet."""
    applied = AppliedConfig(runtime.engine, runtime.target).read()
    if applied is None:
        return None
    return changed_keys(applied, current_config(runtime))


def apply_config(runtime: SourceRuntime, force: bool = False) -> ConfigEdit:
    """Bring the runtime's store in line with sources.yaml (and the source table's row-level
    security); when nothing changed, checked again at most every RECHECK_SECONDS per runtime
    (a sensor's runtime lives as long as the code location); `force`: check now."""
    if not force and time.monotonic() - runtime.config_checked_at < RECHECK_SECONDS:
        return ConfigEdit()
    _bring_reader_view_current(runtime)
    record = AppliedConfig(runtime.engine, runtime.target)
    current = current_config(runtime)
    if record.read() == current:
        runtime.config_checked_at = time.monotonic()
        return ConfigEdit()
    runtime.feed.ensure()  # triggers re-installed for the columns the edit watches
    with runtime.engine.begin() as conn:
        record.lock(conn)
        applied = record.read(conn)
        if applied == current:  # another process did it meanwhile
            runtime.config_checked_at = time.monotonic()
            return ConfigEdit()
        # Nothing recorded yet: no edit to name, but one full diff all the same.
        changed = changed_keys(applied, current) if applied is not None else {}
        if "table" in changed and applied.get("table"):
            _drop_triggers_on(conn, runtime, applied["table"])
        kept = _keep_leaving_vectors(conn, runtime, changed)
        queued = _queue_full_diff(conn, runtime)
        record.record(conn, current)
    actions = [f"vectors of {kept} chunks of rows that left kept"] if kept else []
    actions += _apply_in_place(runtime, changed)
    edit = ConfigEdit(changed, queued, tuple(actions))
    if edit.changed:
        log.info("%s: %s", runtime.spec.name, edit.describe())
    runtime.config_checked_at = time.monotonic()
    return edit


def _bring_reader_view_current(runtime: SourceRuntime) -> None:
    """A readers' view an earlier version published (`SELECT *`, writable) gets this
    version's columns and refuses writes, whether or not anything else changed."""
    if not (runtime.is_live and runtime.spec.pgvector.enabled):
        return
    with runtime.engine.begin() as conn:
        if not runtime.pgvector.table_exists(conn) or reader_view.is_current(
            conn, runtime.stable_table
        ):
            return
        ddl_lock(conn)
        publish_view(conn, runtime.stable_table, runtime.spec.pg_table)
    log.info(
        "%s: readers' view %s brought to the reader contract",
        runtime.spec.name,
        ".".join(runtime.stable_table),
    )


def _queue_full_diff(conn: sa.Connection, runtime: SourceRuntime) -> int:
    """Queue what a full diff finds (a diff feed compares in full on every run anyway). A
    target with nothing stored yet needs none: its first runs find every row."""
    if runtime.feed.mode == "diff":
        return 0
    stored = conn.scalar(
        sa.text(f"SELECT EXISTS (SELECT 1 FROM {STATE_SCHEMA}.row_state WHERE target = :t)"),
        {"t": runtime.target},
    )
    return runtime.diff.enqueue_pending(conn) if stored else 0


def _keep_leaving_vectors(
    conn: sa.Connection, runtime: SourceRuntime, changed: dict[str, Effect]
) -> int:
    """Before an eligibility edit deletes rows, their vectors go to the vector cache for
    `generations.keep_previous_hours`: undoing the edit within that time embeds nothing."""
    if Effect.ELIGIBILITY not in changed.values() or not runtime.spec.pgvector.enabled:
        return 0
    if not runtime.pgvector.table_exists(conn):
        return 0
    leaving, params = runtime.diff.leaving_rows()
    hours = runtime.spec.generations.keep_previous_hours
    return runtime.vector_cache.keep_leaving(conn, runtime.pgvector.table, leaving, params, hours)


def _drop_triggers_on(conn: sa.Connection, runtime: SourceRuntime, table: str) -> None:
    """The source reads another table now: its capture triggers leave the old one."""
    relation = quote_table(split_qualified(table))
    if not conn.scalar(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": relation}):
        return
    ddl_lock(conn)
    execute_script(conn, drop_triggers_sql(runtime.spec.name, relation))


def _apply_in_place(runtime: SourceRuntime, changed: dict[str, Effect]) -> list[str]:
    done = []
    if {"pgvector.hnsw.m", "pgvector.hnsw.ef_construction"} & changed.keys():
        with runtime.engine.begin() as conn:
            if runtime.pgvector.table_exists(conn) and runtime.pgvector.has_index(conn):
                schema, _ = runtime.spec.pg_table
                index = f"{quote_ident(schema)}.{runtime.pgvector.hnsw_index}"
                conn.execute(sa.text(f"DROP INDEX IF EXISTS {index}"))
                runtime.pgvector.create_index(conn)
                done.append("pgvector HNSW index rebuilt")
    if {"hybrid.enabled", "hybrid.language"} & changed.keys() and runtime.spec.pgvector.enabled:
        with runtime.engine.begin() as conn:
            ddl_lock(conn)
            if runtime.pgvector.table_exists(conn) and (
                action := runtime.pgvector.ensure_lexical(conn)
            ):
                if runtime.is_live:
                    publish_view(conn, runtime.stable_table, runtime.spec.pg_table)
                done.append(action)
    qdrant_keys = {"qdrant.hnsw.m", "qdrant.hnsw.ef_construct", "qdrant.quantization"}
    if qdrant_keys & changed.keys() and runtime.spec.qdrant.enabled:
        store, collection = runtime.qdrant.store, runtime.qdrant.collection
        if store.update_index_config(collection, runtime.qdrant.index_config):
            done.append("Qdrant index config updated")
    edited_column = any(k.startswith("write_back.") for k in changed)
    if edited_column and runtime.column is not None and runtime.is_live:
        with runtime.engine.begin() as conn:
            rows = runtime.column.rewrite_all(conn, enqueue=runtime.feed.mode != "diff")
        done.append(f"{rows} rows sent to the write-back column again")
    return done
