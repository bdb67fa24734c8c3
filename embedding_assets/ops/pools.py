"""Dagster pool limits: how many runs may call one embedder, or write the embedded Qdrant
store, at once. Set on the instance before runs start (dev and sync do it)."""

import dagster as dg

from embedding_assets.config.settings import Settings


def pool_limits(settings: Settings, qdrant_embedded: bool) -> dict[str, int]:
    limits = {
        embedder_pool(name): spec.max_concurrent_runs for name, spec in settings.embedders.items()
    }
    if qdrant_embedded:
        limits[EMBEDDED_QDRANT_POOL] = 1  # one process at a time may hold the store
    return limits


def apply_pool_limits(instance: dg.DagsterInstance, limits: dict[str, int]) -> None:
    for pool, limit in limits.items():
        if instance.event_log_storage.get_concurrency_info(pool).slot_count != limit:
            instance.event_log_storage.set_concurrency_slots(pool, limit)


EMBEDDED_QDRANT_POOL = "qdrant_embedded"


def embedder_pool(embedder_name: str) -> str:
    """The Dagster pool bounding how many runs call this embedder at once."""
    return f"embedder_{embedder_name}"
