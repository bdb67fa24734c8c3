"""Which change feed a source gets: the configured mode, or for `auto` triggers where this role may
create them, else the full diff; one feed object per source runtime."""

import logging

import sqlalchemy as sa

from embedding_assets.config.base import split_qualified
from embedding_assets.config.sources import SourceSpec
from embedding_assets.state.diff import SourceDiff
from embedding_assets.state.feeds import ChangeFeed, DiffFeed
from embedding_assets.state.queue import ChangeQueue
from embedding_assets.state.source_sql import quote_table
from embedding_assets.state.trigger_feed import TriggerFeed
from embedding_assets.state.triggers import (
    CaptureTriggers,
    installed_signature,
    may_create_triggers,
    table_columns,
)
from embedding_assets.state.watermark_feed import WatermarkFeed

log = logging.getLogger(__name__)


class SourceTableMissing(LookupError):
    """The source's table is not there (yet): nothing to capture or sync."""


def resolve_mode(engine: sa.Engine, spec: SourceSpec, watched_extra: tuple[str, ...] = ()) -> str:
    """`auto`: triggers for a `table:` source when this role may create them, else diff."""
    if spec.change_capture != "auto":
        return spec.change_capture
    if spec.table is None:
        return "diff"
    with engine.connect() as conn:
        table = quote_table(split_qualified(spec.table))
        if not conn.scalar(sa.text("SELECT to_regclass(:t) IS NOT NULL"), {"t": table}):
            raise SourceTableMissing(
                f"source {spec.name!r}: table {spec.table} does not exist; create it (or "
                "fix `table:` in sources.yaml)"
            )
        if may_create_triggers(conn, table):
            return "trigger"
        triggers = CaptureTriggers(spec, table_columns(conn, spec), watched_extra)
        installed = installed_signature(conn, triggers)
        if installed in (triggers.body_signature, triggers.previous_body_signature):
            return "trigger"  # a DBA installed them for this role
    log.warning(
        "source %s: this role may not create triggers on %s; capturing changes by full diff "
        "(`embedding-assets triggers sql` prints the SQL for a DBA)",
        spec.name,
        spec.table,
    )
    return "diff"


FEEDS = {"trigger": TriggerFeed, "watermark": WatermarkFeed, "diff": DiffFeed}


def build_feed(
    engine: sa.Engine, spec: SourceSpec, diff: SourceDiff, watched_extra: tuple[str, ...] = ()
) -> ChangeFeed:
    """The source's feed for the generation `diff` compares with; `watched_extra`: the
    template columns of its other generations, which the one capture trigger watches too."""
    queue = ChangeQueue(engine, diff.target)
    mode = resolve_mode(engine, spec, watched_extra)
    return FEEDS[mode](engine, spec, diff, queue, watched_extra)
