#!/usr/bin/env bash
# Creates .venv-readers: the clients applications read our stores with (langchain-postgres,
# langchain-qdrant, llama-index's Postgres and Qdrant stores), in their own environment:
# llama-index pins SQLAlchemy < 2.1 and pgvector < 0.4, which must stay out of the project's
# .venv. Used by embedding_assets_tests/integration/readers (the reader contract).
# Idempotent: does nothing when the pinned versions are already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-readers
PYTHON=${PYTHON:-python3}
PINS=(
    "langchain-postgres==0.0.19"
    "langchain-qdrant==1.1.0"
    "llama-index-vector-stores-postgres==0.9.0"
    "llama-index-vector-stores-qdrant==0.10.4"
    "qdrant-client==1.20.0"  # the project's: the same local-mode storage
    "psycopg[binary]==3.3.9"
)
STAMP="$VENV/.pins"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${PINS[*]}" ]; then
    echo "$VENV: readers already installed"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "${PINS[@]}"
echo "${PINS[*]}" > "$STAMP"
echo "$VENV: readers installed"
