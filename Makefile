# Two commands for a fresh clone:  make dev  (set up + run everything)  and  make test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install dev test lint format benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch first: otherwise sentence-transformers pulls the newest CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Embedded Postgres + demo data + Dagster UI/daemon on http://127.0.0.1:3000 (Ctrl-C stops all).
dev: install
	$(BIN)/embedding-assets dev

# infinity-emb in its own environment: a third-party OpenAI-compatible server for the tests.
.venv-infinity/bin/infinity_emb:
	PYTHON=$(PYTHON) scripts/install-infinity.sh

# The clients applications read our stores with (LangChain, LlamaIndex), in their own
# environment: the reader-contract test runs them.
.venv-readers/.pins: scripts/install-readers.sh
	PYTHON=$(PYTHON) scripts/install-readers.sh

# Debian's Chromium for the browser test (Playwright drives it; no browser download). Where
# packages cannot be installed the test says so and is skipped.
/usr/bin/chromium:
	@if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -q chromium >/dev/null 2>&1 || \
		(apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null) || \
		echo "could not install chromium: the browser test is skipped"; \
	else echo "no /usr/bin/chromium and no root apt-get: the browser test is skipped"; fi

## Lint, then the whole test suite (what CI runs).
test: install .venv-infinity/bin/infinity_emb .venv-readers/.pins /usr/bin/chromium
	$(BIN)/ruff check embedding_assets embedding_assets_tests benchmarks
	$(BIN)/ruff format --check embedding_assets embedding_assets_tests benchmarks
	$(BIN)/pytest

format: install
	$(BIN)/ruff format embedding_assets embedding_assets_tests benchmarks
	$(BIN)/ruff check --fix embedding_assets embedding_assets_tests benchmarks

## Figures, not assertions: a full demo sync; embedding throughput (in-process, worker, bf16).
benchmark: install
	$(BIN)/python benchmarks/sync_demo.py
	$(BIN)/python benchmarks/embedders.py

clean:
	rm -rf $(VENV) .venv-infinity .pytest_cache .ruff_cache
