from pathlib import Path

import pytest

from embedding_assets.config.settings import BUNDLED_SOURCES, SettingsError, load_settings

BASE = """
embedders:
  local: {provider: sentence_transformers}
sources:
  - name: docs
    table: app.docs
    text: "{title}: {body}"
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "sources.yaml"
    path.write_text(text)
    return load_settings(path)


def test_bundled_demo_loads():
    settings = load_settings(BUNDLED_SOURCES)
    spec = settings.source("pypi_packages")
    assert spec.text_columns == ["name", "summary"]
    assert spec.shard_keys == ["00", "01", "02", "03", "04", "05", "06", "07"]


def test_defaults(tmp_path):
    spec = load(tmp_path, BASE).source("docs")
    assert spec.pg_table == ("app", "docs_embeddings")
    assert spec.qdrant_collection == "docs"
    assert (spec.shards, spec.max_rows_per_run, spec.sensor_interval_seconds) == (8, 20000, 2)
    assert (spec.change_capture, spec.reconcile.cron) == ("auto", "0 3 * * *")
    assert (spec.chunking.max_tokens, spec.chunking.overlap) == (256, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("    query: select 1\n", "exactly one of `table:` or `query:`"),
        ("    embedder: remote\n", "not declared under `embedders:`"),
        ("    chunking: {max_tokens: 64, overlap: 64}\n", "must be smaller"),
        ("    metadata: [embedding]\n", "clash with columns"),
        ("    colour: blue\n", "colour"),
        ("    shards: 0\n", "shards"),
        ("    write_back: {column: body}\n", "also read by the source"),
        ("    where: embedding is null\n    write_back: {column: embedding}\n", "also read"),
        ("    write_back: {column: e, model_column: e}\n", "names a column twice"),
        ("    write_back: {column: e, row_vector: max}\n", "row_vector"),
        ("    live: true\n    change_capture: diff\n", "live: true needs capture triggers"),
        ("    hybrid: {language: Not-A-Config}\n", "language"),
        ("    generations: {evaluate: {queries: q.jsonl, metric: map_at_5}}\n", "metric"),
    ],
)
def test_invalid_sources_name_the_problem(tmp_path, change, message):
    with pytest.raises(SettingsError, match=message):
        load(tmp_path, BASE + change)


@pytest.mark.parametrize("template", ["{title!r}", "{title:>10}", "no columns", "{0}"])
def test_templates_must_be_plain_columns(tmp_path, template):
    with pytest.raises(SettingsError, match="template"):
        load(tmp_path, BASE.replace('"{title}: {body}"', repr(template)))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    with pytest.raises(SettingsError, match="not valid YAML"):
        load(tmp_path, "sources: [\n")


def test_write_back_into_a_query_source_needs_a_side_table(tmp_path):
    query = BASE.replace("    table: app.docs\n", "    query: select * from app.docs\n")
    with pytest.raises(SettingsError, match="needs a `table:` source"):
        load(tmp_path, query + "    write_back: {column: embedding}\n")
    spec = load(tmp_path, query + "    write_back: {column: embedding, table: app.v}\n")
    assert spec.source("docs").write_back.columns == ["embedding"]


def test_hybrid_live_and_the_quality_gate(tmp_path):
    spec = load(tmp_path, BASE).source("docs")
    assert (spec.hybrid.enabled, spec.hybrid.language, spec.live) == (True, "simple", None)
    assert spec.generations.evaluate is None
    off = load(tmp_path, BASE + "    hybrid: false\n    live: false\n").source("docs")
    assert (off.hybrid.enabled, off.live) == (False, False)
    on = load(tmp_path, BASE + "    hybrid: true\n").source("docs")
    assert on.hybrid.enabled
    gate = (
        load(tmp_path, BASE + "    generations: {evaluate: {queries: labels/q.jsonl}}\n")
        .source("docs")
        .generations.evaluate
    )
    # Relative to sources.yaml, whatever the working directory.
    assert gate.queries == str(tmp_path.resolve() / "labels" / "q.jsonl")
    assert (gate.metric, gate.max_drop) == ("ndcg_at_10", 0.02)
