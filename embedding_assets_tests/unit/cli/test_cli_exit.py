"""The console entry leaves with os._exit (no interpreter teardown): its output must still
be flushed and its exit status the command's."""

import subprocess
import sys

CLI = [sys.executable, "-m", "embedding_assets.cli"]


def test_help_is_printed_and_exits_zero():
    done = subprocess.run([*CLI, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "sync" in done.stdout and done.stdout.endswith("\n")


def test_an_error_keeps_its_message_and_status(tmp_path):
    missing = tmp_path / "missing.yaml"
    done = subprocess.run(
        [*CLI, "--sources", str(missing), "status"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode not in (0, None)
    assert "missing.yaml" in done.stderr


def test_a_usage_error_exits_two():
    done = subprocess.run([*CLI, "no-such-command"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no-such-command" in done.stderr


def test_every_console_script_of_pyproject_names_a_callable_that_exists():
    """`make dev` runs the installed `embedding-assets` script: its target must import (a
    module moved by a refactor once left it pointing at nothing)."""
    import importlib
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[3] / "pyproject.toml"
    scripts = tomllib.loads(pyproject.read_text())["project"]["scripts"]
    assert scripts
    for name, target in scripts.items():
        module, _, attribute = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), name
