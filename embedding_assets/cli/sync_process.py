"""What a sync process does around its runs: loads local models early, fails fast when no endpoint
of a remote embedder answers, and stops cleanly on SIGINT or SIGTERM (the run in progress marked
failed, its pool slots freed)."""

import os
import signal

import click

from embedding_assets.config.settings import Settings
from embedding_assets.ops.worker_address import worker_hint

RUN_IN_PROGRESS: dict[str, str] = {}  # the run this process executes now, for a signal


def run_interruptible(work, instance) -> None:
    """Run `work` (shard runs) off the main thread, so Dagster does not take over SIGINT, and
    make SIGINT and SIGTERM stop the sync at once: the run in progress is marked failed and
    its pool slots are freed before the process exits. Every stage is crash-safe (the next
    sync or the sensor finishes the work), so stopping mid-run loses nothing."""
    import threading

    failure: list[BaseException] = []
    terminal = os.dup(2)  # stderr as it is now, before Dagster captures a run's output

    def target() -> None:
        try:
            work()
        except BaseException as exc:  # re-raised on the main thread
            failure.append(exc)

    def stop(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        run_id = RUN_IN_PROGRESS.get("id")
        if run_id:
            run = instance.get_run_by_id(run_id)
            if run is not None and not run.is_finished:
                instance.report_run_failed(run, f"embedding-assets sync stopped by {name}")
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        message = (
            f"sync stopped by {name}"
            + (f"; run {run_id} marked failed and its pool slots freed" if run_id else "")
            + ". Nothing is lost: the next sync (or the sensor) finishes the work.\n"
        )
        os.write(terminal, message.encode())  # fd 2 may be a run's captured log now
        os._exit(128 + signum)

    thread = threading.Thread(target=target, name="embedding-assets-sync", daemon=True)
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        os.close(terminal)
    if failure:
        raise failure[0]


def preload_local_models(settings: Settings, sources: list[str]) -> None:
    """Start loading the in-process models of these sources in the background."""
    from embedding_assets.embedders.build import make_embedder

    for name in sources:
        embedder = make_embedder(settings.embedder_for(settings.source(name)))
        load = getattr(embedder, "load_in_background", None)
        if load is not None:
            load()


def require_reachable_embedders(settings: Settings, sources: list[str]) -> None:
    """Fail in a second, not after minutes of retries, when no endpoint of a remote
    embedder accepts connections (the usual cause: the local worker is not running)."""
    import socket
    from urllib.parse import urlsplit

    for name in sources:
        spec = settings.embedder_for(settings.source(name))
        urls = getattr(spec, "base_urls", ())
        if not urls:
            continue
        for url in urls:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                socket.create_connection((parts.hostname, port), timeout=3).close()
                break
            except OSError:
                continue
        else:
            raise click.ClickException(
                f"source {name!r} embeds through {', '.join(urls)}, and none of them accepts "
                f"connections.{worker_hint(urls)}"
            )
