"""`embedding-assets errors`: rows the embedder failed on (why, how often, when they are tried
again), and `errors replay`."""

import json

import click

from embedding_assets.cli.common import (
    ensure_database,
    generation_runtimes,
    settings_from,
    source_names,
)
from embedding_assets.config.settings import Settings


def errors_report(settings: Settings, source: str, dead_only: bool, limit: int) -> list[dict]:
    return [
        error
        for runtime in generation_runtimes(settings, source, register=False)
        for error in _generation_errors(runtime, source, dead_only, limit)
    ]


def _generation_errors(runtime, source: str, dead_only: bool, limit: int) -> list[dict]:
    spec = runtime.spec
    return [
        {
            "source": source,
            "generation": runtime.number,
            "row_id": e.row_id,
            "shard": spec.shard_keys[e.shard] if e.shard < spec.shards else str(e.shard),
            "state": e.state,
            "kind": e.kind,
            "attempts": e.attempts,
            "max_attempts": spec.retries.max_attempts,
            "first_failed_at": e.first_failed_at.isoformat(),
            "last_failed_at": e.last_failed_at.isoformat(),
            "next_retry_at": e.next_retry_at.isoformat() if e.next_retry_at else None,
            "content_hash": e.content_hash,
            "message": e.message,
        }
        for e in runtime.errors.list(limit, dead_only)
    ]


@click.group(invoke_without_command=True)
@click.option("--source", help="Only this source (default: all).")
@click.option("--dead", "dead_only", is_flag=True, help="Only rows that are no longer retried.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def errors(
    ctx: click.Context, source: str | None, dead_only: bool, limit: int, as_json: bool
) -> None:
    """Rows the embedder failed on: why, how often, and when they are tried again. A row is
    retried after a growing wait and is dead after `retries.max_attempts` failures of the
    same content (it is tried again when it changes, or by `errors replay`)."""
    if ctx.invoked_subcommand is not None:
        return
    ensure_database()
    settings = settings_from(ctx)
    found = [
        e
        for name in source_names(settings, source)
        for e in errors_report(settings, name, dead_only, limit)
    ]
    if as_json:
        click.echo(json.dumps(found))
        return
    if not found:
        click.echo("no failed rows")
        return
    for e in found:
        when = (
            f"retry at {e['next_retry_at']}"
            if e["next_retry_at"]
            else ("dead" if e["state"] == "dead" else "queued for retry")
        )
        click.echo(
            f"{e['source']}/{e['shard']}  {e['row_id']}  {e['kind']}  "
            f"{e['attempts']}/{e['max_attempts']} attempts, {when}: {e['message']}"
        )


@errors.command("replay")
@click.option("--source", help="Only this source (default: all).")
@click.option("--row", "rows", multiple=True, help="A row id (repeatable).")
@click.option("--all-dead", is_flag=True, help="Every dead row.")
@click.option("--all", "every", is_flag=True, help="Every failed row, dead or waiting.")
@click.pass_context
def errors_replay(
    ctx: click.Context, source: str | None, rows: tuple[str, ...], all_dead: bool, every: bool
) -> None:
    """Forget rows' failures and make them pending now (the next sync or sensor run tries
    them again), in the live generation and the one being built."""
    if sum([bool(rows), all_dead, every]) != 1:
        raise click.UsageError("give --row ID (repeatable), --all-dead or --all")
    ensure_database()
    settings = settings_from(ctx)
    for name in source_names(settings, source):
        replayed = 0
        for runtime in generation_runtimes(settings, name):
            replayed += runtime.errors.replay(
                list(rows) if rows else None,
                dead_only=all_dead,
                enqueue=runtime.feed.mode != "diff",
            )
        click.echo(f"{name}: {replayed} rows pending again")
