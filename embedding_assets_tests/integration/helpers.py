"""Builds throwaway sources in the test database and syncs them through the real job."""

import textwrap
import uuid
from pathlib import Path

import dagster as dg
import sqlalchemy as sa

from embedding_assets.config.settings import Settings, load_settings
from embedding_assets.definitions import build_definitions
from embedding_assets.state.db import engine_for


def unique_name(prefix: str = "src") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def create_docs_table(url: str, table: str, rows: list[dict]) -> None:
    """A source table: id integer key, title/body text, category/views metadata, archived flag."""
    engine = engine_for(url)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                f"CREATE TABLE {table} (id integer PRIMARY KEY, title text, body text, "
                "category text, views integer, archived boolean NOT NULL DEFAULT false)"
            )
        )
        if rows:
            conn.execute(
                sa.text(
                    f"INSERT INTO {table} (id, title, body, category, views, archived) "
                    "VALUES (:id, :title, :body, :category, :views, :archived)"
                ),
                [{"category": "misc", "views": 0, "archived": False, **r} for r in rows],
            )


def write_settings(tmp_path: Path, name: str, table: str, **overrides: str) -> Settings:
    options = {
        "shards": "4",
        "max_rows_per_run": "20000",
        "chunking": "{max_tokens: 64, overlap: 8}",
        **overrides,
    }
    extra = "\n".join(f"    {k}: {v}" for k, v in options.items())
    text = textwrap.dedent(
        f"""\
        embedders:
          local:
            provider: sentence_transformers
            model: all-MiniLM-L6-v2
        sources:
          - name: {name}
            table: {table}
            id_column: id
            text: "{{title}}: {{body}}"
            where: "not archived"
            metadata: [category, views]
            embedder: local
        """
    )
    path = tmp_path / f"{name}.yaml"
    path.write_text(text + extra + "\n")
    return load_settings(path)


def fake_embedder_settings(
    tmp_path: Path, name: str, url: str, embedder: dict[str, str], source: dict[str, str]
) -> Path:
    """sources.yaml for table `name` embedded by an OpenAI-compatible fake at `url`."""
    embedder_lines = "".join(f"    {k}: {v}\n" for k, v in embedder.items())
    source_lines = "".join(f"    {k}: {v}\n" for k, v in source.items())
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        "embedders:\n  fake:\n    provider: openai\n    model: fake-embedding\n"
        f'    base_urls: ["{url}"]\n    dimension: 8\n{embedder_lines}'
        f"sources:\n  - name: {name}\n    table: {name}\n"
        f'    text: "{{title}}: {{body}}"\n    embedder: fake\n{source_lines}'
    )
    return path


def queue_length(url: str, target: str) -> int:
    """Entries in the change queue for `target`."""
    with engine_for(url).connect() as conn:
        return int(
            conn.scalar(
                sa.text("SELECT count(*) FROM embedding_assets.change_queue WHERE target = :t"),
                {"t": target},
            )
        )


def sync_shards(
    settings: Settings,
    source: str,
    instance: dg.DagsterInstance,
    shards: list[str] | None = None,
    raise_on_error: bool = True,
) -> dict[str, dg.ExecuteInProcessResult]:
    defs = build_definitions(settings)
    job = defs.resolve_job_def(f"{source}_sync")
    keys = shards or settings.source(source).shard_keys
    return {
        key: job.execute_in_process(
            partition_key=key, instance=instance, raise_on_error=raise_on_error
        )
        for key in keys
    }


def materialization_metadata(result: dg.ExecuteInProcessResult, stage: str) -> dict:
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.path[-1] == stage:
            return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError(f"no materialization of {stage}")


def dagster_database(url: str) -> str:
    """A new Dagster instance database beside the test database: its runs and slots are
    one test's. Returns its psycopg2 URL (what dagster-postgres needs)."""
    from sqlalchemy.engine import make_url

    database = unique_name("dagster")
    with engine_for(url).connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(
            sa.text(f"CREATE DATABASE {database}")
        )
    return (
        make_url(url)
        .set(drivername="postgresql+psycopg2", database=database)
        .render_as_string(hide_password=False)
    )


def create_login_role(url: str, role: str) -> str:
    """CREATE ROLE for a login over TCP, which needs a password: the one `url` carries, so
    the URL with only its user changed logs in as the role."""
    from sqlalchemy.engine import make_url

    password = (make_url(url).password or "").replace("'", "''")
    return f"CREATE ROLE {role} LOGIN PASSWORD '{password}'"
