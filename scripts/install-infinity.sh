#!/usr/bin/env bash
# Creates .venv-infinity: infinity-emb, a third-party OpenAI-compatible embedding server, in its
# own environment (it pins sentence-transformers 3.x / transformers 4.x / numpy 1.x, which must
# stay out of the project's .venv). Used by embedding_assets_tests/integration/test_infinity.py.
# Idempotent: does nothing when the pinned version is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-infinity
PYTHON=${PYTHON:-python3}
VERSION=0.0.78

if "$VENV/bin/python" -c "import importlib.metadata as m, sys; \
sys.exit(m.version('infinity_emb') != '$VERSION')" 2>/dev/null; then
    echo "$VENV: infinity-emb $VERSION already installed"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
# The CPU wheel of torch first (as in the Makefile): otherwise pip pulls a CUDA build.
"$VENV/bin/pip" install --quiet torch==2.13.0
# `v2 --engine torch` needs only these extras; [all] adds optimum, ctranslate2, vision, audio.
"$VENV/bin/pip" install --quiet "infinity-emb[server,torch]==$VERSION"
echo "$VENV: infinity-emb $VERSION installed"
