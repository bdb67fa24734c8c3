"""`embedding_assets.EmbeddingSync` through Dagster's own component loader (a defs folder
sandbox, as `dg` builds a project of its own): scaffolded, loaded from defs.yaml and built,
it gives exactly the definitions the same entries of sources.yaml give, and two components
share their resources."""

from pathlib import Path

import dagster as dg
from dagster.components.testing import create_defs_folder_sandbox

from embedding_assets.config.components import component_declarations
from embedding_assets.config.settings import load_settings
from embedding_assets.definitions import build_definitions
from embedding_assets.defs.component import EmbeddingSync

ENTRIES = {
    "docs": {
        "name": "docs",
        "table": "public.docs",
        "text": "{title}: {body}",
        "embedder": "local",
        "metadata": ["category"],
        "shards": 4,
        "reconcile": {"cron": "0 4 * * *"},
    },
    "tickets": {
        "name": "tickets",
        "query": "SELECT id, subject FROM public.tickets",
        "text": "{subject}",
        "embedder": "local",
        "qdrant": False,
        "change_capture": "diff",
    },
}


def shape(defs: dg.Definitions) -> dict:
    """What a user sees of the definitions: keys, names, partitions, resources."""
    repository = defs.get_repository_def()
    assets = {
        key.to_user_string(): (
            tuple(node.partitions_def.get_partition_keys()) if node.partitions_def else None
        )
        for key, node in ((a.key, a) for a in repository.asset_graph.asset_nodes)
    }
    return {
        "assets": assets,
        "checks": sorted(str(k) for k in repository.asset_graph.asset_check_keys),
        "jobs": sorted(j.name for j in repository.get_all_jobs() if not j.name.startswith("__")),
        "sensors": sorted(s.name for s in repository.sensor_defs),
        "schedules": sorted(s.name for s in repository.schedule_defs),
        "resources": sorted(defs.resources or {}),
    }


def test_components_give_the_definitions_their_sources_yaml_entries_give(tmp_path: Path) -> None:
    import yaml

    (tmp_path / "sources.yaml").write_text(
        yaml.safe_dump(
            {
                "embedders": {"local": {"provider": "sentence_transformers"}},
                "sources": list(ENTRIES.values()),
            }
        )
    )
    expected = shape(build_definitions(load_settings(tmp_path / "sources.yaml", None)))
    assert "docs/embeddings" in expected["assets"] and "tickets_changes" in expected["sensors"]
    with create_defs_folder_sandbox() as sandbox:
        paths = {
            name: sandbox.scaffold_component(
                EmbeddingSync,
                defs_path=name,
                defs_yaml_contents={"type": "embedding_assets.EmbeddingSync", "attributes": entry},
            )
            for name, entry in ENTRIES.items()
        }
        with sandbox.load_component_and_build_defs(defs_path=paths["docs"]) as (component, defs):
            assert isinstance(component, EmbeddingSync) and component.source.shards == 4
            one = shape(defs)
        with sandbox.build_all_defs() as defs:
            both = shape(defs)
    assert both == expected  # two components merged: shared resources, nothing missing
    docs_only = {k: v for k, v in expected["assets"].items() if k.startswith("docs/")}
    assert one["assets"] == docs_only and one["resources"] == both["resources"]


def test_scaffolding_writes_a_defs_yaml_with_the_fields_a_new_source_needs() -> None:
    import yaml

    with create_defs_folder_sandbox() as sandbox:
        path = sandbox.scaffold_component(EmbeddingSync, defs_path="support_articles")
        written = yaml.safe_load((path / "defs.yaml").read_text())
        assert written["type"].endswith("EmbeddingSync")
        assert written["attributes"]["name"] == "support_articles"
        # The project's own loader reads the same file (dg scaffold names the type
        # embedding_assets.EmbeddingSync, scaffolding by class its defining module).
        (declared,) = component_declarations(path.parent)
        assert declared.source().table == "public.support_articles"
        with sandbox.load_component_and_build_defs(defs_path=path) as (component, defs):
            assert component.source.table == "public.support_articles"
            assert "support_articles/vector_index" in shape(defs)["assets"]
