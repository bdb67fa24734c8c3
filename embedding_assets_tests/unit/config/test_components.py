"""Sources declared as EmbeddingSync components (config.components): parsed and validated as
sources.yaml's entries are, `{{ env.NAME }}` rendered, and merged by `load_settings` into one
Settings with the sources.yaml beside them."""

from pathlib import Path

import pytest

from embedding_assets.config.components import component_declarations
from embedding_assets.config.settings import SettingsError, load_settings

SOURCES = """embedders:
  local: {provider: sentence_transformers}
sources:
  - {name: notes, table: public.notes, text: "{title}", embedder: local}
"""

DOCS = """type: embedding_assets.EmbeddingSync

attributes:
  name: docs
  table: "{{ env.DOCS_TABLE }}"
  text: "{title}: {body}"
  embedder: remote
  metadata: [category]
  shards: 4
  embedders:
    remote:
      provider: openai
      model: text-embedding-3-small
      base_urls: ["{{ env.EMBEDDER_URL }}"]
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name / "defs.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_a_component_and_a_sources_yaml_entry_give_one_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCS_TABLE", "public.docs")
    monkeypatch.setenv("EMBEDDER_URL", "http://127.0.0.1:9/v1")
    (tmp_path / "sources.yaml").write_text(SOURCES)
    write(tmp_path / "defs", "docs", DOCS)
    settings = load_settings(tmp_path / "sources.yaml", tmp_path / "defs")
    assert [s.name for s in settings.sources] == ["notes", "docs"]
    docs = settings.source("docs")
    assert (docs.table, docs.shards, docs.metadata) == ("public.docs", 4, ["category"])
    assert settings.embedder_for(docs).base_urls == ("http://127.0.0.1:9/v1",)
    assert set(settings.embedders) == {"local", "remote"}
    # The same entry in sources.yaml gives the same source.
    entry = (
        '  - {name: docs, table: public.docs, text: "{title}: {body}", embedder: local, '
        "metadata: [category], shards: 4}\n"
    )
    (tmp_path / "both.yaml").write_text(SOURCES + entry)
    from_file = load_settings(tmp_path / "both.yaml", None).source("docs")
    assert from_file.model_dump(exclude={"embedder"}) == docs.model_dump(exclude={"embedder"})


def test_other_component_types_and_empty_folders_are_ignored(tmp_path):
    write(tmp_path, "other", "type: dagster.DefinitionsComponent\nattributes: {path: x.py}\n")
    assert component_declarations(tmp_path) == []
    assert component_declarations(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("declaration", "problem"),
    [
        (DOCS.replace("shards: 4", "shards: 4\n  bogus: 1"), "bogus"),
        (DOCS.replace("embedder: remote", "embedder: nowhere"), "nowhere"),
        (DOCS, "DOCS_TABLE is not set"),
    ],
)
def test_a_bad_declaration_names_its_file_and_the_problem(
    tmp_path, monkeypatch, declaration, problem
):
    monkeypatch.delenv("DOCS_TABLE", raising=False)
    if problem != "DOCS_TABLE is not set":
        monkeypatch.setenv("DOCS_TABLE", "public.docs")
    monkeypatch.setenv("EMBEDDER_URL", "http://127.0.0.1:9/v1")
    (tmp_path / "sources.yaml").write_text(SOURCES)
    path = write(tmp_path / "defs", "docs", declaration)
    with pytest.raises(SettingsError, match=problem) as error:
        load_settings(tmp_path / "sources.yaml", tmp_path / "defs")
    assert "defs" in str(error.value) and (
        "docs" in str(error.value) or str(path) in str(error.value)
    )


def test_a_component_may_not_redefine_an_embedder_of_sources_yaml(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCS_TABLE", "public.docs")
    monkeypatch.setenv("EMBEDDER_URL", "http://127.0.0.1:9/v1")
    (tmp_path / "sources.yaml").write_text(SOURCES)
    write(tmp_path / "defs", "docs", DOCS.replace("    remote:", "    local:").replace(
        "embedder: remote", "embedder: local"))  # fmt: skip
    with pytest.raises(SettingsError, match="embedder 'local' unlike"):
        load_settings(tmp_path / "sources.yaml", tmp_path / "defs")
