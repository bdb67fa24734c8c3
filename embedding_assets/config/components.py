"""Sources declared as Dagster components: `defs.yaml` files of type
`embedding_assets.EmbeddingSync` in the project's defs folder (`dg scaffold defs
embedding_assets.EmbeddingSync <name>` writes one). Their `attributes` are an entry of
sources.yaml, field for field, with an optional `embedders:` of their own; `load_settings`
reads them beside sources.yaml, so both front doors give one Settings and the same
definitions. No Dagster here: the CLI reads them too.

`{{ env.NAME }}` in a string is the variable's value (Dagster's template syntax; sources.yaml
keeps `${NAME}`); a variable that is not set is an error that names it.
"""

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec

COMPONENT_TYPE = "embedding_assets.EmbeddingSync"
# The same class by its defining module (what scaffolding by class writes).
COMPONENT_TYPES = frozenset({COMPONENT_TYPE, "embedding_assets.defs.component.EmbeddingSync"})
# dg's defs folder (its default defs_module, embedding_assets.defs): a folder per component
# beside the Dagster wrappers' modules.
DEFS_FOLDER = Path(__file__).resolve().parents[1] / "defs"
_ENV_TEMPLATE = re.compile(r"\{\{\s*env\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class EmbeddingSyncAttributes(SourceSpec):
    """A source, as an entry of sources.yaml declares it, and the embedders it may name
    beyond those of sources.yaml."""

    embedders: dict[str, EmbedderSpec] = Field(default_factory=dict)

    def source(self) -> SourceSpec:
        return SourceSpec.model_validate(self.model_dump(exclude={"embedders"}))


class ComponentError(ValueError):
    """A component declaration is invalid; the message names its file."""


def render_env(value: Any, where: Path | str) -> Any:
    """`value` with every `{{ env.NAME }}` replaced, in strings at any depth."""
    if isinstance(value, str):

        def replace(match: re.Match) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ComponentError(f"{where}: environment variable {name} is not set")
            return os.environ[name]

        return _ENV_TEMPLATE.sub(replace, value)
    if isinstance(value, dict):
        return {k: render_env(v, where) for k, v in value.items()}
    if isinstance(value, list):
        return [render_env(v, where) for v in value]
    return value


def parse_attributes(raw: dict, where: Path) -> EmbeddingSyncAttributes:
    """The attributes of one declaration (templates rendered), validated as sources.yaml's
    entries are; a gate's queries file relative to the declaration's folder."""
    attributes = render_env(raw, where)
    gate = ((attributes.get("generations") or {}).get("evaluate") or {}) if attributes else {}
    if isinstance(gate, dict) and isinstance(gate.get("queries"), str):
        gate["queries"] = str(where.parent / gate["queries"])
    try:
        return EmbeddingSyncAttributes.model_validate(attributes)
    except ValidationError as exc:
        raise ComponentError(f"{where} is invalid:\n{exc}") from exc


def component_declarations(folder: Path) -> list[EmbeddingSyncAttributes]:
    """Every EmbeddingSync declared in the defs.yaml files under `folder`, in path order."""
    found = []
    for path in sorted(folder.rglob("defs.yaml")) if folder.is_dir() else []:
        try:
            documents = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ComponentError(f"{path} is not valid YAML: {exc}") from exc
        for document in documents:
            if isinstance(document, dict) and document.get("type") in COMPONENT_TYPES:
                found.append(parse_attributes(document.get("attributes") or {}, path))
    return found


def merge_embedders(
    base: dict[str, EmbedderSpec], declared: list[tuple[str, dict[str, EmbedderSpec]]]
) -> dict[str, EmbedderSpec]:
    """sources.yaml's embedders and the components' own ((source name, embedders) each); one
    name means one embedder."""
    merged = dict(base)
    for source, embedders in declared:
        for name, spec in embedders.items():
            if name in merged and merged[name] != spec:
                raise ComponentError(
                    f"component {source!r} declares embedder {name!r} unlike the one of that "
                    "name in sources.yaml or another component: give it another name"
                )
            merged[name] = spec
    return merged
