"""`embedding-assets dev`: Postgres, the demo data, the inference worker and Dagster's webserver
and daemon (`dg dev`), stopped together on Ctrl-C or SIGTERM."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import click

from embedding_assets.cli.common import embedded_server, settings_from
from embedding_assets.ops.paths import CHECKOUT
from embedding_assets.ops.worker_address import worker_port, worker_url


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=3000, show_default=True, type=int)
@click.option(
    "--live/--no-live",
    default=True,
    show_default=True,
    help="Start the live lane (`embedding-assets live`) beside Dagster; without it, only "
    "the sensor's runs write changes.",
)
@click.pass_context
def dev(ctx: click.Context, host: str, port: int, live: bool) -> None:
    """Postgres, the demo data, the inference worker, the live lane, and the Dagster
    webserver + daemon with the sensors on. Ctrl-C stops everything this command started."""
    import dagster as dg

    from embedding_assets.config.settings import BUNDLED_SOURCES
    from embedding_assets.ops.demo import load_demo
    from embedding_assets.ops.environment import (
        database_url,
        prepare_dagster_home,
        uses_embedded_postgres,
    )
    from embedding_assets.ops.metrics import MULTIPROC_ENV, fresh_multiprocess_dir
    from embedding_assets.ops.pools import apply_pool_limits, pool_limits
    from embedding_assets.state.db import engine_for

    started_postgres = uses_embedded_postgres() and embedded_server().start()
    url = database_url()
    settings = settings_from(ctx)
    if settings.path == BUNDLED_SOURCES.resolve():
        rows = load_demo(engine_for(url))
        click.echo(f"demo source public.pypi_packages: {rows} rows")
    home = prepare_dagster_home()
    with dg.DagsterInstance.get() as instance:
        apply_pool_limits(instance, pool_limits(settings, not os.environ.get("QDRANT_URL")))
    env = {**os.environ, "EMBEDDING_ASSETS_SOURCES": str(settings.path)}
    if MULTIPROC_ENV not in env:  # the runs' embedder calls on the worker's /metrics
        env.update(fresh_multiprocess_dir(home / "metrics"))
    children: list[subprocess.Popen] = []
    stopping: list[str] = []
    stop_following = threading.Event()

    def stop(signum: int, _frame) -> None:
        stopping.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    # Set, not inherited: a `dev` started in the background (`&`, nohup) inherits SIGINT
    # ignored, and SIGTERM (supervisors, containers) would otherwise kill it uncleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        if any(worker_url() in getattr(e, "base_urls", ()) for e in settings.embedders.values()):
            children.append(start_worker(env))
        if live and any(may_go_live(spec) for spec in settings.sources):
            children.append(start_lane(env, settings.path))
        click.echo(f"Dagster home {home}; UI on http://{host}:{port}")
        # `dg dev`, the current command (`dagster dev` warns that it is superseded), with
        # the workspace given so no dg project config is needed. Run from the Dagster home:
        # from the checkout, Dagster warns about the dagster.yaml it sees there.
        command = [
            str(Path(sys.executable).with_name("dg")), "dev",
            "-w", str(CHECKOUT / "workspace.yaml"), "-h", host, "-p", str(port),
            "--log-level", "warning",
        ]  # fmt: skip
        children.append(subprocess.Popen(command, env=env, cwd=home, start_new_session=True))
        follow_sources(settings.path, f"http://{host}:{port}/graphql", stop_following)
        children[-1].wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_following.set()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up
        for child in reversed(children):  # Dagster first, then the worker its runs call
            stop_child(child)
        if started_postgres:
            embedded_server().stop()
            click.echo("stopped embedded Postgres")
    if stopping:
        click.echo(f"stopped by {stopping[0]}")
        sys.exit(0)
    sys.exit(children[-1].returncode or 0 if children else 1)


CODE_LOCATION = "embedding_assets"  # workspace.yaml's location_name


def follow_sources(path: Path, graphql_url: str, stop: threading.Event) -> None:
    """In the background: a valid save of sources.yaml reloads the code location; a broken
    one prints one line and keeps the loaded configuration running."""
    from embedding_assets.ops.sources_watch import SourcesWatch, reload_code_location

    def reload() -> None:
        error = reload_code_location(graphql_url, CODE_LOCATION)
        if error:
            click.echo(f"{path} saved, but the code location did not load: {error}", err=True)
        else:
            click.echo(f"{path} saved: code location reloaded; edits apply at the next tick")

    def broken(message: str) -> None:
        click.echo(
            f"{message[:600]} -- the loaded configuration keeps running; save a fixed file "
            "to apply it",
            err=True,
        )

    watch = SourcesWatch(path, reload, broken)
    threading.Thread(target=watch.run, args=(stop,), daemon=True, name="sources-watch").start()


def start_worker(env: dict[str, str]) -> subprocess.Popen:
    """`embedding-assets serve` on the worker port; returns once it answers /health."""
    import urllib.request

    worker = subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "serve", "--port", str(worker_port())],
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise click.ClickException(f"the inference worker exited ({worker.returncode})")
        try:
            with urllib.request.urlopen(f"{worker_url()[:-3]}/health", timeout=2):
                click.echo(f"inference worker on {worker_url()}")
                return worker
        except OSError:
            time.sleep(0.5)
    stop_child(worker)
    raise click.ClickException("the inference worker did not answer /health within 120 s")


def may_go_live(spec) -> bool:
    """A source the live lane may serve (capture triggers notify it), unless `live: false`."""
    return (
        spec.live is not False
        and spec.table is not None
        and spec.change_capture
        in (
            "auto",
            "trigger",
        )
    )


def start_lane(env: dict[str, str], sources: Path) -> subprocess.Popen:
    """`embedding-assets live`, beside the worker it embeds through (it waits for nothing:
    a source not synced yet is served once its first sync installs the triggers)."""
    lane = subprocess.Popen(
        [sys.executable, "-m", "embedding_assets.cli", "--sources", str(sources), "live"],
        env=env,
        start_new_session=True,
    )
    click.echo("live lane started (`embedding-assets status` shows it)")
    return lane


def stop_child(child: subprocess.Popen) -> None:
    """Interrupt a child started in its own session, then end whatever is left of its
    process group. Children get their own session because a terminal's Ctrl-C reaching
    Dagster's code server directly leaves it running after its parents exit."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
    try:
        child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(2)
