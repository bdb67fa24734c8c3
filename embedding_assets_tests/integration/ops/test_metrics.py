"""Prometheus /metrics of the real worker (`embedding-assets serve`), scraped while a sync runs:
the store's figures (read from Postgres at each scrape, whoever writes) and the model's calls
move as the rows are written; a database that cannot be reached reads as store_up 0."""

import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from embedding_assets.cli.sync import sync_source
from embedding_assets.config.settings import load_settings
from embedding_assets.ops.metrics import StoreCollector
from embedding_assets.state.db import engine_for
from embedding_assets_tests.conftest import free_port
from embedding_assets_tests.integration.helpers import create_docs_table, unique_name

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "embedding_assets.cli"]


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one scrape."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def figure(samples: dict, name: str, source: str) -> float:
    labels = (("generation", "1"), ("source", source), ("state", "live"))
    return samples[(name, labels)]


def model_calls(samples: dict) -> float:
    return sum(v for (n, _), v in samples.items() if n == "gen_ai_client_token_usage_count")


def source_on_worker(url: str, folder: Path, worker: str, rows: int, options: str):
    """A table of `rows` rows and a sources.yaml embedding it through the worker."""
    name = unique_name()
    create_docs_table(url, name, [{"id": i, "title": f"t{i}", "body": "b"} for i in range(rows)])
    sources = folder / "sources.yaml"
    sources.write_text(
        f"embedders:\n  worker: {{provider: openai, model: all-MiniLM-L6-v2, "
        f'base_urls: ["{worker}/v1"], dimension: 384}}\n'
        f"sources:\n  - {{name: {name}, table: {name}, text: '{{title}}: {{body}}', "
        f"embedder: worker, {options}}}\n"
    )
    return name, sources


@pytest.fixture
def shared_dir(tmp_path: Path) -> Path:
    """PROMETHEUS_MULTIPROC_DIR for the worker and the sync processes (as `dev` sets it)."""
    folder = tmp_path / "metrics"
    folder.mkdir()
    return folder


@pytest.fixture
def worker(postgres, home, shared_dir: Path) -> str:
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PROMETHEUS_MULTIPROC_DIR": str(shared_dir),
    }
    process = subprocess.Popen(
        [*CLI, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise AssertionError("the worker did not start") from None
            time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(30)


def test_metrics_move_while_a_sync_writes(postgres, worker, tmp_path: Path, instance) -> None:
    name, sources = source_on_worker(
        postgres, tmp_path, worker, 40, "shards: 2, max_rows_per_run: 60, metadata: [category]"
    )
    settings = load_settings(sources)
    assert all(r.success for r in sync_source(settings, name, None, instance))
    first = scrape(worker)
    assert first[("embedding_assets_store_up", ())] == 1
    assert figure(first, "embedding_assets_rows_embedded_total", name) == 40
    assert figure(first, "embedding_assets_pending_rows", name) == 0
    assert figure(first, "embedding_assets_pgvector_qdrant_parity_delta", name) == 0
    assert figure(first, "embedding_assets_dead_rows", name) == 0
    assert figure(first, "embedding_assets_last_write_timestamp_seconds", name) > 0
    with engine_for(postgres).begin() as conn:
        conn.execute(
            sa.text(
                f"INSERT INTO {name} (id, title, body) "
                "SELECT i, 'row ' || i, repeat('words ', 20) FROM generate_series(100, 699) AS i"
            )
        )
    queued = scrape(worker)
    assert figure(queued, "embedding_assets_pending_rows", name) == 600
    assert figure(queued, "embedding_assets_oldest_pending_seconds", name) >= 0

    seen: list[tuple[float, float]] = []
    done = threading.Event()

    def keep_scraping() -> None:
        while not done.is_set():
            samples = scrape(worker)
            seen.append(
                (
                    figure(samples, "embedding_assets_pending_rows", name),
                    figure(samples, "embedding_assets_rows_embedded_total", name),
                )
            )
            time.sleep(0.05)

    scraper = threading.Thread(target=keep_scraping)
    scraper.start()
    try:
        assert all(r.success for r in sync_source(settings, name, None, instance))
    finally:
        done.set()
        scraper.join(60)
    last = scrape(worker)
    assert figure(last, "embedding_assets_pending_rows", name) == 0
    assert figure(last, "embedding_assets_rows_embedded_total", name) == 640
    assert figure(last, "embedding_assets_pgvector_qdrant_parity_delta", name) == 0
    assert model_calls(last) > model_calls(queued)  # the worker's model calls, counted
    # Seen between the two ends while the runs wrote: the figures move, not jump at the end.
    assert any(0 < pending < 600 and 40 < embedded < 640 for pending, embedded in seen), seen
    assert [e for _, e in seen] == sorted(e for _, e in seen)  # a counter never goes back


def client_calls(samples: dict, provider: str) -> float:
    return sum(
        v
        for (n, labels), v in samples.items()
        if n == "gen_ai_client_operation_duration_seconds_count"
        and ("gen_ai_provider_name", provider) in labels
    )


def test_a_sync_process_calls_are_on_the_workers_metrics_after_it_ended(
    postgres, worker, shared_dir: Path, tmp_path: Path
) -> None:
    """A run is a process of its own: sharing PROMETHEUS_MULTIPROC_DIR with the worker, its
    embedder's HTTP calls (provider openai) are on the worker's /metrics once it has ended."""
    name, sources = source_on_worker(postgres, tmp_path, worker, 30, "shards: 1")
    before = client_calls(scrape(worker), "openai")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared_dir)}
    done = subprocess.run(
        [*CLI, "--sources", str(sources), "sync", "--source", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    after = scrape(worker)
    assert client_calls(after, "openai") > before
    assert client_calls(after, "sentence_transformers") > 0  # the worker's own model calls


def test_a_database_out_of_reach_reads_as_store_up_0() -> None:
    collector = StoreCollector(f"postgresql://nobody@127.0.0.1:{free_port()}/nothing")
    families = list(collector.collect())
    assert [(f.name, f.samples[0].value) for f in families] == [("embedding_assets_store_up", 0)]
