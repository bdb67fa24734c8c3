"""Both Qdrant stores against real engines: qdrant-edge on disk and qdrant-client's in-memory mode.

``QdrantClient(":memory:")`` makes the same client calls a server gets, so the server store's
request shapes are exercised without a server (none can run here).
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path

import numpy as np
import pytest

from embedding_assets.destinations.qdrant_embedded import EmbeddedQdrantStore, EmbeddedStoreHeld
from embedding_assets.destinations.qdrant_engines import open_qdrant_store
from embedding_assets.destinations.qdrant_server import ServerQdrantStore
from embedding_assets.destinations.qdrant_store import IndexConfig, IndexPoint, QdrantStore

pytestmark = pytest.mark.integration

COLLECTION = "docs_minilm"
SHARDS = 8


def make_points(n: int, dim: int, *, seed: int = 0, prefix: str = "row") -> list[IndexPoint]:
    """``n`` random unit vectors with the payload the pipeline writes (shard assigned at random)."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    shards = rng.integers(0, SHARDS, size=n)
    return [
        IndexPoint(
            id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{prefix}/{i}")),
            vector=vectors[i],
            payload={
                "row_id": f"{prefix}-{i}",
                "chunk_index": i % 3,
                "shard": int(shards[i]),
                "text": f"chunk text of {prefix} {i}",
            },
        )
        for i in range(n)
    ]


def shard_counts(points: list[IndexPoint]) -> Counter[int]:
    return Counter(p.payload["shard"] for p in points)


@pytest.fixture(params=["embedded", "server"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QdrantStore]:
    impl: QdrantStore
    if request.param == "embedded":
        impl = EmbeddedQdrantStore(tmp_path / "qdrant")
    else:
        # Imported here: the spawned child below imports this module, and the client costs 1.5 s.
        from qdrant_client import QdrantClient

        impl = ServerQdrantStore(QdrantClient(":memory:"))
    yield impl
    impl.close()


def test_ensure_collection_creates_once(store: QdrantStore) -> None:
    assert not store.collection_exists(COLLECTION)
    assert store.ensure_collection(COLLECTION, 8) is True
    assert store.collection_exists(COLLECTION)
    assert store.ensure_collection(COLLECTION, 8) is False


def test_sparse_lexical_vector_beside_the_dense_one_in_both_engines(store: QdrantStore) -> None:
    """BM25 terms (qdrant-edge's model, computed on our side) in the sparse `lexical` vector;
    the engine's IDF weights them. Lexical finds the rare code; hybrid fuses both lists by
    reciprocal rank; a filter on the shard holds in every mode."""
    from embedding_assets.destinations.qdrant_lexical import document_terms, query_terms

    points = [
        IndexPoint(
            id=p.id,
            vector=p.vector,
            payload=p.payload,
            sparse=document_terms(p.payload["text"], "simple"),
        )
        for p in make_points(40, 8)
    ]
    rare = points[7]
    text = "fails with error ZXQ-4821 on startup"
    points[7] = IndexPoint(
        rare.id, rare.vector, {**rare.payload, "text": text}, document_terms(text, "simple")
    )
    assert store.ensure_collection(COLLECTION, 8, lexical=True)
    assert store.has_lexical(COLLECTION)
    store.upsert(COLLECTION, points)
    terms = query_terms("zxq-4821", "simple")
    lexical = store.search(COLLECTION, [0.0] * 8, 5, mode="lexical", terms=terms)
    assert [h.payload["row_id"] for h in lexical] == ["row-7"]
    query = np.asarray(points[3].vector)  # dense: points[3]; lexical: points[7]
    hybrid = store.search(COLLECTION, query, 5, mode="hybrid", terms=terms)
    assert {h.payload["row_id"] for h in hybrid[:2]} == {"row-3", "row-7"}
    shard = rare.payload["shard"]
    only = store.search(COLLECTION, query, 40, shard=shard, mode="hybrid", terms=terms)
    assert only and {h.payload["shard"] for h in only} == {shard}
    store.ensure_collection(COLLECTION + "_dense", 8)
    assert not store.has_lexical(COLLECTION + "_dense")


def test_whether_a_collection_has_the_sparse_vector_follows_it_being_made_again(
    store: QdrantStore,
) -> None:
    """The server store keeps a yes (asked before every lexical search); a collection
    deleted and made again without the vector answers no, in both engines."""
    store.ensure_collection(COLLECTION, 8, lexical=True)
    assert store.has_lexical(COLLECTION) and store.has_lexical(COLLECTION)
    store.delete_collection(COLLECTION)
    assert not store.has_lexical(COLLECTION)
    store.ensure_collection(COLLECTION, 8, lexical=False)
    assert not store.has_lexical(COLLECTION)


def test_dimension_mismatch_names_both_dimensions_and_the_fix(store: QdrantStore) -> None:
    store.ensure_collection(COLLECTION, 8)
    with pytest.raises(ValueError) as excinfo:
        store.ensure_collection(COLLECTION, 384)
    message = str(excinfo.value)
    assert COLLECTION in message
    assert "8-dimensional" in message and "384-dimensional" in message
    assert "another collection name" in message and "delete the collection" in message


def test_upsert_count_idempotent_delete(store: QdrantStore) -> None:
    points = make_points(1000, 8)
    store.ensure_collection(COLLECTION, 8)
    store.upsert(COLLECTION, points)
    assert store.count(COLLECTION) == 1000
    expected = shard_counts(points)
    for k in range(SHARDS):
        assert store.count(COLLECTION, shard=k) == expected[k]

    # Same deterministic ids again (the re-run of a shard): replaced, not duplicated.
    store.upsert(COLLECTION, points)
    assert store.count(COLLECTION) == 1000

    removed, kept = points[:150], points[150:]
    unknown = [str(uuid.uuid4()) for _ in range(5)]
    store.delete(COLLECTION, [p.id for p in removed] + unknown)
    assert store.count(COLLECTION) == 850
    expected = shard_counts(kept)
    for k in range(SHARDS):
        assert store.count(COLLECTION, shard=k) == expected[k]
    assert store.retrieve(COLLECTION, [removed[0].id]) == []


def test_delete_shard_removes_only_that_shard(store: QdrantStore) -> None:
    points = make_points(300, 8)
    store.ensure_collection(COLLECTION, 8)
    store.upsert(COLLECTION, points)
    expected = shard_counts(points)
    store.delete_shard(COLLECTION, 3)
    assert store.count(COLLECTION, shard=3) == 0
    assert store.count(COLLECTION) == 300 - expected[3]
    assert store.count(COLLECTION, shard=4) == expected[4]
    store.delete_shard("nope", 3)  # a missing collection has nothing to delete
    with pytest.raises(TypeError):
        store.count(COLLECTION, shard=True)  # bool is an int; it must not mean shard 1


def test_session_groups_operations(store: QdrantStore) -> None:
    points = make_points(20, 8)
    with store.session(COLLECTION):
        assert store.ensure_collection(COLLECTION, 8) is True
        store.upsert(COLLECTION, points)
        store.delete(COLLECTION, [points[0].id])
        assert store.count(COLLECTION) == 19
    assert store.count(COLLECTION) == 19


def test_search_finds_the_stored_vector_first(store: QdrantStore) -> None:
    points = make_points(1000, 384)
    store.ensure_collection(COLLECTION, 384)
    store.upsert(COLLECTION, points)
    for probe in (points[0], points[417], points[-1]):
        hits = store.search(COLLECTION, list(np.asarray(probe.vector)), limit=5)
        assert len(hits) == 5
        assert hits[0].id == probe.id
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[0].payload == probe.payload
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_index_config_and_exact_search_are_accepted(store: QdrantStore) -> None:
    # The server store sends HNSW and int8 quantization settings with the collection and
    # hnsw_ef / exact with each search; the embedded engine always searches exactly.
    config = IndexConfig(m=8, ef_construct=32, ef_search=64, quantization="scalar")
    points = make_points(300, 64)
    store.ensure_collection(COLLECTION, 64, config)
    store.upsert(COLLECTION, points)
    probe = list(np.asarray(points[7].vector))
    approximate = store.search(COLLECTION, probe, limit=10, config=config)
    exact = store.search(COLLECTION, probe, limit=10, exact=True, config=config)
    assert approximate[0].id == exact[0].id == points[7].id
    assert [h.id for h in exact] == [h.id for h in approximate]


def test_retrieve_returns_stored_points_with_payload(store: QdrantStore) -> None:
    points = make_points(50, 8)
    store.ensure_collection(COLLECTION, 8)
    store.upsert(COLLECTION, points)
    wanted = points[3:6]
    hits = store.retrieve(COLLECTION, [p.id for p in wanted] + [str(uuid.uuid4())])
    assert {h.id: h.payload for h in hits} == {p.id: p.payload for p in wanted}
    assert all(h.score == 0.0 for h in hits)


def test_ids_come_back_in_canonical_form(store: QdrantStore) -> None:
    point = make_points(1, 8)[0]
    shouted = IndexPoint(point.id.upper(), point.vector, point.payload)
    store.ensure_collection(COLLECTION, 8)
    store.upsert(COLLECTION, [shouted])
    assert store.search(COLLECTION, list(np.asarray(point.vector)), limit=1)[0].id == point.id
    assert [h.id for h in store.retrieve(COLLECTION, [shouted.id])] == [point.id]
    store.delete(COLLECTION, [shouted.id])
    assert store.count(COLLECTION) == 0


def test_missing_collection_reads_as_empty(store: QdrantStore) -> None:
    assert not store.collection_exists("nope")
    assert store.count("nope") == 0
    assert store.count("nope", shard=3) == 0
    assert store.search("nope", [1.0] * 8, limit=3) == []
    assert store.retrieve("nope", [str(uuid.uuid4())]) == []
    store.delete("nope", [str(uuid.uuid4())])  # nothing to delete is not an error
    assert not store.collection_exists("nope")


def test_delete_collection(store: QdrantStore) -> None:
    store.ensure_collection(COLLECTION, 8)
    store.upsert(COLLECTION, make_points(10, 8))
    assert store.delete_collection(COLLECTION) is True
    assert not store.collection_exists(COLLECTION)
    assert store.delete_collection(COLLECTION) is False
    assert store.ensure_collection(COLLECTION, 16) is True  # the documented fix for a mismatch


# --- the embedded store only ----------------------------------------------------------------------


def test_embedded_data_survives_reopen(tmp_path: Path) -> None:
    points = make_points(200, 8)
    first = EmbeddedQdrantStore(tmp_path)
    first.ensure_collection(COLLECTION, 8)
    first.upsert(COLLECTION, points)
    first.close()

    assert (tmp_path / COLLECTION / "edge_config.json").is_file()  # one shard dir per collection
    second = EmbeddedQdrantStore(tmp_path)
    assert second.ensure_collection(COLLECTION, 8) is False
    assert second.count(COLLECTION) == 200
    hit = second.search(COLLECTION, list(np.asarray(points[7].vector)), limit=1)[0]
    assert (hit.id, hit.payload) == (points[7].id, points[7].payload)
    with pytest.raises(ValueError, match="384"):
        second.ensure_collection(COLLECTION, 384)  # the shard's own config kept the dimension


def test_embedded_upsert_needs_the_collection(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ensure_collection"):
        EmbeddedQdrantStore(tmp_path).upsert(COLLECTION, make_points(1, 8))


def _hold_with_qdrant_edge(path: str, opened: MpEvent, release: MpEvent) -> None:
    import qdrant_edge

    shard = qdrant_edge.EdgeShard.load(path)
    opened.set()
    release.wait(60)
    shard.close()


def test_embedded_collection_held_by_a_foreign_reader_fails_our_writes_saying_why(
    tmp_path: Path,
) -> None:
    """Another process opening the engine's folder with qdrant-edge (no flock of ours) holds its
    WAL: our write fails loudly, naming the cause and the fix, and works once it lets go."""
    store = EmbeddedQdrantStore(tmp_path)
    store.ensure_collection(COLLECTION, 8)
    context = multiprocessing.get_context("spawn")
    opened, release = context.Event(), context.Event()
    reader = context.Process(
        target=_hold_with_qdrant_edge, args=(str(tmp_path / COLLECTION), opened, release)
    )
    reader.start()
    try:
        assert opened.wait(60)
        with pytest.raises(EmbeddedStoreHeld, match="not embedding-assets.*QDRANT_URL"):
            store.upsert(COLLECTION, make_points(3, 8))
    finally:
        release.set()
        reader.join(60)
    store.upsert(COLLECTION, make_points(3, 8))
    assert store.count(COLLECTION) == 3


def test_embedded_rejects_path_like_names(tmp_path: Path) -> None:
    store = EmbeddedQdrantStore(tmp_path)
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(ValueError, match="invalid collection name"):
            store.ensure_collection(bad, 8)


def test_embedded_sessions_nest_and_release(tmp_path: Path) -> None:
    store = EmbeddedQdrantStore(tmp_path)
    points = make_points(100, 8)
    with store.session(COLLECTION):
        assert store.ensure_collection(COLLECTION, 8) is True
        store.upsert(COLLECTION, points)
        with store.session(COLLECTION):  # nested: reuses, must not deadlock on its own flock
            assert store.count(COLLECTION) == 100
        with pytest.raises(RuntimeError, match="inside its own session"):
            store.delete_collection(COLLECTION)
    assert EmbeddedQdrantStore(tmp_path, lock_timeout_s=1).count(COLLECTION) == 100


def test_retrieve_with_vectors_returns_the_stored_vectors(store: QdrantStore) -> None:
    points = make_points(20, 8)
    store.ensure_collection(COLLECTION, 8)
    store.upsert(COLLECTION, points)
    hits = {h.id: h for h in store.retrieve(COLLECTION, [p.id for p in points[:5]], vectors=True)}
    for point in points[:5]:
        stored = np.asarray(point.vector, dtype=np.float32)
        stored /= np.linalg.norm(stored)  # cosine collections keep unit vectors
        np.testing.assert_allclose(hits[point.id].vector, stored, rtol=1e-5, atol=1e-6)
    assert all(h.vector is None for h in store.retrieve(COLLECTION, [points[0].id]))


def test_embedded_brief_releases_the_store_inside_keep_open(tmp_path: Path) -> None:
    """A reader outside the store's pool (restoring vectors in the embeddings step) must
    not keep the store locked for the rest of its run: another process's Qdrant step
    would wait for it while it waits for that step's pool slot."""
    store = EmbeddedQdrantStore(tmp_path)
    store.ensure_collection(COLLECTION, 8)
    other = EmbeddedQdrantStore(tmp_path, lock_timeout_s=0.3)
    with store.keep_open(), ThreadPoolExecutor(1) as pool:
        with store.brief():
            store.retrieve(COLLECTION, [str(uuid.uuid4())], vectors=True)
        assert pool.submit(other.count, COLLECTION).result() == 0  # not held
        store.count(COLLECTION)  # kept open from here on, as a run's Qdrant step does
        with pytest.raises(TimeoutError):
            pool.submit(other.count, COLLECTION).result()


def test_embedded_holder_hands_a_kept_collection_to_a_waiter_and_reopens_it(
    tmp_path: Path,
) -> None:
    """A run keeps its collection open between shards; the live lane (another process, here
    another thread: flock excludes per open file) waits for it. Between shards the run
    yields it to the waiter only, and reopens it on its next use."""
    run = EmbeddedQdrantStore(tmp_path)
    run.ensure_collection(COLLECTION, 8)
    lane = EmbeddedQdrantStore(tmp_path, lock_timeout_s=30)
    with run.keep_open(), ThreadPoolExecutor(1) as pool:
        run.upsert(COLLECTION, make_points(10, 8, prefix="run"))  # opened and kept
        assert run.yield_to_waiters() == []  # nobody waits: kept open
        waiting = pool.submit(lane.upsert, COLLECTION, make_points(5, 8, prefix="lane"))
        time.sleep(0.3)
        assert not waiting.done()  # blocked on the run's lock
        assert run.yield_to_waiters() == [COLLECTION]
        waiting.result(timeout=30)
        assert run.count(COLLECTION) == 15  # reopened, with the lane's points
    assert EmbeddedQdrantStore(tmp_path, lock_timeout_s=0.3).count(COLLECTION) == 15


def test_embedded_lock_waits_then_times_out(tmp_path: Path) -> None:
    holder = EmbeddedQdrantStore(tmp_path)
    holder.ensure_collection(COLLECTION, 8)
    impatient = EmbeddedQdrantStore(tmp_path, lock_timeout_s=0.3)
    # Another thread is another lock holder: flock excludes per open file, not per process.
    with holder.session(COLLECTION), ThreadPoolExecutor(1) as pool:
        future = pool.submit(impatient.count, COLLECTION)
        with pytest.raises(TimeoutError, match="only one process"):
            future.result()
    assert impatient.count(COLLECTION) == 0


def test_embedded_threads_share_a_root(tmp_path: Path) -> None:
    store = EmbeddedQdrantStore(tmp_path)
    store.ensure_collection(COLLECTION, 8)
    batches = [make_points(40, 8, seed=i, prefix=f"t{i}") for i in range(6)]

    def write(i: int) -> None:
        # Half the threads share the store object, half bring their own: both must queue.
        target = store if i % 2 else EmbeddedQdrantStore(tmp_path)
        target.upsert(COLLECTION, batches[i])
        assert target.count(COLLECTION) >= 40

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(write, range(6)))
    assert store.count(COLLECTION) == 240


def _child_upserts(root: str, started: MpEvent) -> None:
    # Runs in a spawned process: many small upserts, each opening the shard under the lock.
    store = EmbeddedQdrantStore(Path(root))
    points = make_points(600, 8, seed=1, prefix="child")
    started.set()
    for start in range(0, len(points), 100):
        store.upsert(COLLECTION, points[start : start + 100])


def test_embedded_two_processes_write_concurrently(tmp_path: Path) -> None:
    store = EmbeddedQdrantStore(tmp_path)
    store.ensure_collection(COLLECTION, 8)
    ctx = multiprocessing.get_context("spawn")  # no fork of a process with engine threads
    started = ctx.Event()
    child = ctx.Process(target=_child_upserts, args=(str(tmp_path), started))
    child.start()
    try:
        assert started.wait(60), "child process did not start"
        points = make_points(600, 8, seed=2, prefix="parent")
        for start in range(0, len(points), 100):
            store.upsert(COLLECTION, points[start : start + 100])
    finally:
        child.join(60)
    assert child.exitcode == 0
    assert store.count(COLLECTION) == 1200


def test_embedded_throughput_and_open_time(tmp_path: Path) -> None:
    points = make_points(10_000, 384)
    store = EmbeddedQdrantStore(tmp_path)
    store.ensure_collection(COLLECTION, 384)
    started = time.perf_counter()
    store.upsert(COLLECTION, points)  # one lock + open + flush + close around 20 batches
    upsert_s = time.perf_counter() - started

    opens = []
    for _ in range(3):  # each count opens the 10k-point shard afresh
        started = time.perf_counter()
        assert store.count(COLLECTION) == 10_000
        opens.append(time.perf_counter() - started)
    hit = store.search(COLLECTION, list(np.asarray(points[9_999].vector)), limit=1)[0]
    assert hit.id == points[9_999].id

    rate = len(points) / upsert_s
    print(
        f"\nembedded qdrant: upsert 10,000 x 384-d in {upsert_s:.2f} s = {rate:,.0f} points/s; "
        f"open+count+close of the 10k shard {min(opens) * 1000:.0f}-{max(opens) * 1000:.0f} ms"
    )
    assert rate > 500  # loose: only catches a collapse (qdrant-client's local mode does ~200/s)


# --- wiring and secrets ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Api key is used with an insecure connection")
def test_server_repr_and_logs_hide_secrets(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    # No server here: skip the client's background version probe (it only warns).
    store = ServerQdrantStore.from_url(
        "http://admin:hunter2@127.0.0.1:1/", "s3cr3t-key", check_compatibility=False
    )
    try:
        text = repr(store)
        assert "127.0.0.1:1" in text
        assert "s3cr3t-key" not in text and "hunter2" not in text
        assert "s3cr3t-key" not in caplog.text
    finally:
        store.close()


def test_open_qdrant_store_picks_by_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    embedded = open_qdrant_store(None, None, tmp_path)
    assert isinstance(embedded, EmbeddedQdrantStore) and embedded.root == tmp_path
    assert isinstance(embedded, QdrantStore)

    calls: list[tuple[str, str | None]] = []

    def fake_from_url(url: str, api_key: str | None) -> str:
        calls.append((url, api_key))
        return "server store"

    monkeypatch.setattr(ServerQdrantStore, "from_url", fake_from_url)
    assert open_qdrant_store("http://qdrant:6333", "key", tmp_path) == "server store"
    assert calls == [("http://qdrant:6333", "key")]
