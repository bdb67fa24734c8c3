"""The local inference worker: one warm model behind an OpenAI-compatible ``/v1/embeddings``.

A run that imports sentence-transformers pays ~8 CPU-s before it embeds anything; a run that
calls this worker pays ~2. Concurrent requests (8 shards syncing at once) are merged into one
``embed_documents`` call by a single batcher task, which also serialises the model (it is not
thread-safe). No Dagster here; request bodies are never logged (they are user data).

    python -m embedding_assets.worker --port 8321     # or: embedding-assets serve
"""
