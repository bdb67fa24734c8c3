"""`dev` follows edits of sources.yaml and of the EmbeddingSync components' defs.yaml: a valid
save reloads the code location (so sensors and runs use it at once), a broken one is reported
in one line and changes nothing (the loaded definitions keep running), and the first valid
save after it recovers by itself."""

import contextlib
import hashlib
import json
import logging
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

from embedding_assets.config.components import DEFS_FOLDER
from embedding_assets.config.settings import SettingsError, load_settings

log = logging.getLogger(__name__)

RELOAD_MUTATION = """mutation Reload($name: String!) {
  reloadRepositoryLocation(repositoryLocationName: $name) {
    __typename
    ... on WorkspaceLocationEntry { locationOrLoadError { __typename
      ... on PythonError { message } } }
    ... on PythonError { message }
  }
}"""


def reload_code_location(graphql_url: str, location: str, timeout: float = 60) -> str | None:
    """Ask the webserver to reload a code location; returns its load error, None if loaded."""
    body = json.dumps({"query": RELOAD_MUTATION, "variables": {"name": location}}).encode()
    request = urllib.request.Request(
        graphql_url, data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.loads(response.read())
    result = (answer.get("data") or {}).get("reloadRepositoryLocation") or {}
    loaded = result.get("locationOrLoadError") or {}
    message = result.get("message") or loaded.get("message")
    if answer.get("errors"):
        message = "; ".join(e.get("message", "") for e in answer["errors"])
    return message


def _fingerprint(path: Path) -> str | None:
    """Of sources.yaml and the components' defs.yaml files beside it (one loader reads both)."""
    digest = hashlib.sha256()
    try:
        digest.update(path.read_bytes())
    except OSError:
        return None
    for declaration in sorted(DEFS_FOLDER.rglob("defs.yaml")) if DEFS_FOLDER.is_dir() else []:
        with contextlib.suppress(OSError):
            digest.update(str(declaration).encode() + declaration.read_bytes())
    return digest.hexdigest()


class SourcesWatch:
    """Polls the file; calls `on_valid()` after a valid edit and `on_error(message)` after a
    broken one, once per saved content."""

    def __init__(
        self, path: Path, on_valid: Callable[[], None], on_error: Callable[[str], None]
    ) -> None:
        self.path = path
        self.on_valid = on_valid
        self.on_error = on_error
        self.seen = _fingerprint(path)

    def poll(self) -> bool:
        """Check once; True when the file changed since the last poll."""
        current = _fingerprint(self.path)
        if current == self.seen:
            return False
        self.seen = current
        try:
            load_settings(self.path)
        except SettingsError as exc:
            self.on_error(" ".join(str(exc).split()))
            return True
        self.on_valid()
        return True

    def run(self, stop: threading.Event, interval: float = 1.0) -> None:
        while not stop.wait(interval):
            try:
                self.poll()
            except Exception as exc:  # a failed reload is reported, and tried at the next save
                log.warning("following %s: %s", self.path, exc)
