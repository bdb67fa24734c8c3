"""A Qdrant server through qdrant-client (QDRANT_URL, QDRANT_API_KEY): collections, aliases,
payload indexes, HNSW settings."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from embedding_assets.core.fusion import candidates
from embedding_assets.destinations.qdrant_lexical import LEXICAL_VECTOR
from embedding_assets.destinations.qdrant_store import (
    DEFAULT_INDEX_CONFIG,
    DELETE_BATCH_SIZE,
    PAYLOAD_INDEXES,
    UPSERT_BATCH_SIZE,
    IndexConfig,
    IndexHit,
    IndexPoint,
    as_floats,
    batches,
    canonical_id,
    fused_hits,
    hit_id,
    mismatch_error,
    shard_filter_args,
    vector_of,
)

if TYPE_CHECKING:
    # Importing qdrant-client costs ~1.5 s; only the server store needs it, at run time.
    import qdrant_client
    from qdrant_client import models as qdrant_models

log = logging.getLogger(__name__)


def _redact_url(url: str) -> str:
    # A URL may carry credentials (https://user:secret@host); keep only scheme, host and path.
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class ServerQdrantStore:
    """Collections on a Qdrant server (or qdrant-client's ``:memory:`` mode in tests)."""

    def __init__(self, client: qdrant_client.QdrantClient, *, description: str = "client") -> None:
        self._client = client
        self._description = description  # what repr shows; never the API key
        self._lexical: set[str] = set()  # collections known to have the sparse vector

    @classmethod
    def from_url(
        cls,
        url: str,
        api_key: str | None,
        *,
        timeout_s: int = 60,
        check_compatibility: bool = True,
    ) -> ServerQdrantStore:
        from qdrant_client import QdrantClient

        client = QdrantClient(
            url=url,
            api_key=api_key,
            timeout=timeout_s,
            check_compatibility=check_compatibility,  # a version probe in a background thread
        )
        return cls(client, description=f"url={_redact_url(url)!r}")

    def __repr__(self) -> str:
        return f"ServerQdrantStore({self._description})"

    def ensure_collection(
        self,
        name: str,
        dimension: int,
        config: IndexConfig = DEFAULT_INDEX_CONFIG,
        lexical: bool = False,
    ) -> bool:
        from qdrant_client import models

        if dimension < 1:
            raise ValueError(f"dimension must be positive, got {dimension}")
        created = False
        if not self._client.collection_exists(name):
            quantization = None
            if config.quantization == "scalar":
                quantization = models.ScalarQuantization(
                    scalar=models.ScalarQuantizationConfig(
                        type=models.ScalarType.INT8, always_ram=True
                    )
                )
            try:
                self._client.create_collection(
                    name,
                    vectors_config=models.VectorParams(
                        size=dimension, distance=models.Distance.COSINE
                    ),
                    hnsw_config=models.HnswConfigDiff(m=config.m, ef_construct=config.ef_construct),
                    quantization_config=quantization,
                    sparse_vectors_config={
                        LEXICAL_VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)
                    }
                    if lexical
                    else None,
                )
                created = True
                log.info("created Qdrant collection %r (%d-d, cosine)", name, dimension)
            except Exception:
                # Another writer may have created it between our check and our create.
                if not self._client.collection_exists(name):
                    raise
        info = self._client.get_collection(name)
        if not created:
            self._check_config(name, info, dimension)
        self._ensure_payload_indexes(name, info)
        return created

    def update_index_config(self, name: str, config: IndexConfig) -> bool:
        from qdrant_client import models

        if not self._client.collection_exists(name):
            return False
        quantization = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
            )
            if config.quantization == "scalar"
            else models.Disabled.DISABLED
        )
        self._client.update_collection(
            name,
            hnsw_config=models.HnswConfigDiff(m=config.m, ef_construct=config.ef_construct),
            quantization_config=quantization,
        )
        return True

    def collection_exists(self, name: str) -> bool:
        return bool(self._client.collection_exists(name))

    def has_lexical(self, name: str) -> bool:
        # Asked before every lexical or hybrid search: a collection never loses a named
        # vector, so a yes is kept (a collection deleted here is forgotten).
        if name in self._lexical:
            return True
        if not self._client.collection_exists(name):
            return False
        sparse = self._client.get_collection(name).config.params.sparse_vectors or {}
        if LEXICAL_VECTOR in sparse:
            self._lexical.add(name)
            return True
        return False

    def delete_collection(self, name: str) -> bool:
        self._lexical.discard(name)
        if not self._client.collection_exists(name):
            return False
        return bool(self._client.delete_collection(name))

    def upsert(self, name: str, points: Sequence[IndexPoint]) -> None:
        from qdrant_client import models

        for batch in batches(points, UPSERT_BATCH_SIZE):
            # A column Batch skips building one pydantic PointStruct per point.
            dense = [as_floats(p.vector) for p in batch]
            vectors = dense
            if all(p.sparse is not None for p in batch):  # a collection with `lexical`
                sparse = [
                    models.SparseVector(indices=p.sparse[0], values=p.sparse[1]) for p in batch
                ]
                vectors = {"": dense, LEXICAL_VECTOR: sparse}
            self._client.upsert(
                name,
                points=models.Batch(
                    ids=[canonical_id(p.id) for p in batch],
                    vectors=vectors,
                    payloads=[p.payload for p in batch],
                ),
                wait=True,
            )

    def delete(self, name: str, ids: Sequence[str]) -> None:
        from qdrant_client import models

        if not ids or not self._client.collection_exists(name):
            return
        for batch in batches(ids, DELETE_BATCH_SIZE):
            self._client.delete(
                name,
                points_selector=models.PointIdsList(points=[canonical_id(i) for i in batch]),
                wait=True,
            )

    def delete_shard(self, name: str, shard: int) -> None:
        from qdrant_client import models

        flt = self._shard_filter(shard)
        if not self._client.collection_exists(name):
            return
        self._client.delete(name, points_selector=models.FilterSelector(filter=flt), wait=True)

    def count(self, name: str, shard: int | None = None) -> int:
        flt = None if shard is None else self._shard_filter(shard)
        if not self._client.collection_exists(name):
            return 0
        return int(self._client.count(name, count_filter=flt, exact=True).count)

    def search(
        self,
        name: str,
        vector: Sequence[float],
        limit: int,
        shard: int | None = None,
        exact: bool = False,
        config: IndexConfig = DEFAULT_INDEX_CONFIG,
        mode: str = "dense",
        terms: tuple[list[int], list[float]] | None = None,
        lexical_weight: float = 1.0,
    ) -> list[IndexHit]:
        from qdrant_client import models

        if limit < 1 or not self._client.collection_exists(name):
            return []
        only = None if shard is None else self._shard_filter(shard)
        params = models.SearchParams(
            hnsw_ef=max(config.ef_search, limit),
            exact=exact,
            quantization=models.QuantizationSearchParams(rescore=True),
        )
        n = candidates(limit) if mode == "hybrid" else limit
        requests = []
        if mode != "lexical":
            requests.append(
                models.QueryRequest(query=as_floats(vector), filter=only, params=params, limit=n)
            )
        if mode != "dense" and terms is not None:
            sparse = models.SparseVector(indices=terms[0], values=terms[1])
            requests.append(
                models.QueryRequest(query=sparse, using=LEXICAL_VECTOR, filter=only, limit=n)
            )
        for request in requests:
            request.with_payload = True
        # Both sides of a hybrid search in one round trip, fused on our side (core.fusion).
        responses = self._client.query_batch_points(name, requests=requests)
        results = [
            [IndexHit(hit_id(p.id), float(p.score), dict(p.payload or {})) for p in r.points]
            for r in responses
        ]
        return fused_hits(results, lexical_weight, limit) if mode == "hybrid" else results[0]

    def retrieve(self, name: str, ids: Sequence[str], vectors: bool = False) -> list[IndexHit]:
        if not ids or not self._client.collection_exists(name):
            return []
        records = self._client.retrieve(
            name, ids=[canonical_id(i) for i in ids], with_payload=True, with_vectors=vectors
        )
        return [
            IndexHit(hit_id(r.id), 0.0, dict(r.payload or {}), vector_of(r) if vectors else None)
            for r in records
        ]

    supports_aliases = True

    def alias_target(self, alias: str) -> str | None:
        for description in self._client.get_aliases().aliases:
            if description.alias_name == alias:
                return description.collection_name
        return None

    def point_alias(self, alias: str, collection: str) -> None:
        from qdrant_client import models

        actions: list[Any] = []
        if self.alias_target(alias) is not None:
            actions.append(
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=alias))
            )
        actions.append(
            models.CreateAliasOperation(
                create_alias=models.CreateAlias(collection_name=collection, alias_name=alias)
            )
        )
        # One request: Qdrant applies the alias changes of a request atomically.
        self._client.update_collection_aliases(change_aliases_operations=actions)

    @contextlib.contextmanager
    def keep_open(self) -> Iterator[None]:
        yield  # nothing to open: a server keeps its collections

    @contextlib.contextmanager
    def brief(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[None]:
        # The server serialises writers itself; nothing to hold.
        yield

    def yield_to_waiters(self) -> list[str]:
        return []  # a server serves every client at once

    def close(self) -> None:
        self._client.close()

    @staticmethod
    def _shard_filter(shard: int) -> qdrant_models.Filter:
        from qdrant_client import models

        key, value = shard_filter_args(shard)
        return models.Filter(
            must=[models.FieldCondition(key=key, match=models.MatchValue(value=value))]
        )

    def _check_config(self, name: str, info: qdrant_models.CollectionInfo, dimension: int) -> None:
        from qdrant_client import models

        vectors = info.config.params.vectors
        if not isinstance(vectors, models.VectorParams):
            raise mismatch_error(name, "named vectors", dimension, "DELETE /collections/" + name)
        distance = vectors.distance
        if vectors.size != dimension or distance != models.Distance.COSINE:
            raise mismatch_error(
                name,
                f"{vectors.size}-dimensional {distance.value} vectors",
                dimension,
                "DELETE /collections/" + name,
            )

    def _ensure_payload_indexes(self, name: str, info: qdrant_models.CollectionInfo) -> None:
        from qdrant_client import models

        # Checked on every ensure, so a crash right after create still ends up indexed.
        existing = set((info.payload_schema or {}).keys())
        for field, kind in PAYLOAD_INDEXES.items():
            if field in existing:
                continue
            try:
                with warnings.catch_warnings():
                    # Local mode warns that payload indexes do nothing there; that is expected.
                    warnings.simplefilter("ignore", UserWarning)
                    self._client.create_payload_index(
                        name, field_name=field, field_schema=models.PayloadSchemaType(kind)
                    )
            except Exception as exc:  # an index speeds filters up; it is not needed for them
                log.warning("could not create payload index %r on %r: %s", field, name, exc)
