"""A whole sources.yaml: its embedders and sources, cross-checked, and the loader (file,
`${VAR}` expansion, validation errors that name the file)."""

import os
import re
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, model_validator

from embedding_assets.config.base import Spec
from embedding_assets.config.components import (
    DEFS_FOLDER,
    ComponentError,
    component_declarations,
    merge_embedders,
)
from embedding_assets.config.embedders import EmbedderSpec
from embedding_assets.config.sources import SourceSpec

BUNDLED_SOURCES = Path(__file__).resolve().parent.parent / "data" / "sources.yaml"


SOURCES_ENV = "EMBEDDING_ASSETS_SOURCES"


class Settings(Spec):
    embedders: dict[str, EmbedderSpec] = Field(default_factory=dict)
    sources: list[SourceSpec]
    path: Path | None = None
    # The defs folder whose EmbeddingSync components were read beside `path` (None: none).
    components: Path | None = None

    @model_validator(mode="after")
    def _references_resolve(self) -> "Settings":
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        for source in self.sources:
            if source.embedder not in self.embedders:
                raise ValueError(
                    f"source {source.name!r} uses embedder {source.embedder!r}, which is not "
                    f"declared under `embedders:` (declared: {sorted(self.embedders)})"
                )
        for what, key in (
            ("pgvector table", lambda s: s.target),
            ("Qdrant collection", lambda s: s.qdrant_collection),
        ):
            owners: dict[str, list[str]] = {}
            for source in self.sources:
                owners.setdefault(key(source), []).append(source.name)
            shared = {name: users for name, users in owners.items() if len(users) > 1}
            if shared:
                name, users = next(iter(shared.items()))
                raise ValueError(
                    f"sources {users} write the same {what} {name!r}: each source keeps its "
                    f"own and removes whatever else it finds there, so give each source its "
                    f"own {what} (pgvector.table / qdrant.collection)"
                )
        return self

    def source(self, name: str) -> SourceSpec:
        for spec in self.sources:
            if spec.name == name:
                return spec
        raise KeyError(f"no source named {name!r}; sources: {[s.name for s in self.sources]}")

    def embedder_for(self, source: SourceSpec) -> EmbedderSpec:
        return self.embedders[source.embedder]


class SettingsError(ValueError):
    """sources.yaml is missing or invalid; the message names the file and the problem."""


def sources_path() -> Path:
    return Path(os.environ.get(SOURCES_ENV) or BUNDLED_SOURCES)


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand_env(text: str) -> str:
    """`${VAR}` and `${VAR:-default}` in sources.yaml, so URLs and ports follow the
    environment (two copies side by side). A missing variable without default is an error."""

    def replace(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            raise SettingsError(f"sources file uses ${{{name}}}, which is not set")
        return value

    return _ENV_REFERENCE.sub(replace, text)


def load_settings(
    path: Path | str | None = None, components: Path | None = DEFS_FOLDER
) -> Settings:
    """sources.yaml (`path`, else $EMBEDDING_ASSETS_SOURCES, else the bundled demo) and the
    sources declared as EmbeddingSync components in the `components` defs folder: one
    Settings, whichever front door a source came in by."""
    path = Path(path) if path else sources_path()
    if not path.is_file():
        raise SettingsError(f"sources file {path} does not exist; set {SOURCES_ENV} to a YAML file")
    try:
        raw = yaml.safe_load(expand_env(path.read_text())) or {}
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise SettingsError(f"{path} must hold a mapping with `embedders:` and `sources:`")
    _anchor_gate_queries(raw, path.resolve().parent)
    try:
        settings = Settings.model_validate({**raw, "path": path.resolve()})
    except ValidationError as exc:
        raise SettingsError(f"{path} is invalid:\n{exc}") from exc
    if components is None:
        return settings
    try:
        declared = component_declarations(components)
        if not declared:
            return settings.model_copy(update={"components": components})
        return Settings.model_validate(
            {
                "embedders": merge_embedders(
                    settings.embedders, [(d.name, d.embedders) for d in declared]
                ),
                "sources": [*settings.sources, *(d.source() for d in declared)],
                "path": settings.path,
                "components": components,
            }
        )
    except (ComponentError, ValidationError) as exc:
        raise SettingsError(f"{path} with the components in {components}: {exc}") from exc


def _anchor_gate_queries(raw: dict, folder: Path) -> None:
    """A quality gate's queries file, relative to the sources file, made absolute."""
    for source in raw.get("sources") or []:
        gate = (
            ((source or {}).get("generations") or {}).get("evaluate")
            if isinstance(source, dict)
            else None
        )
        if isinstance(gate, dict) and isinstance(gate.get("queries"), str):
            gate["queries"] = str(folder / gate["queries"])


def drift(loaded: Settings) -> str | None:
    """Why the file `loaded` came from no longer matches it (broken, or edited), or None.
    What a long-lived process (the code location's sensors) asks before starting work."""
    if loaded.path is None:  # built from components alone: Dagster reloads those
        return None
    try:
        current = load_settings(loaded.path, loaded.components)
    except SettingsError as exc:
        first = str(exc).strip().splitlines()
        return (
            f"{first[0]}{' ' + ' '.join(first[1:3]) if len(first) > 1 else ''}. Nothing is "
            "asked for or deleted until it is fixed; the loaded configuration stays"
        )
    if current != loaded:
        return (
            f"{loaded.path} (or a component's defs.yaml) changed since this code location "
            "loaded it: reload the code "
            "location (Deployment > Reload; `embedding-assets dev` reloads by itself)"
        )
    return None
