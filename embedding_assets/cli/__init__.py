"""The `embedding-assets` command line, one module per command group (main.py assembles them)."""

import os

# Before any command imports transformers: the local model is loaded from its package, offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
