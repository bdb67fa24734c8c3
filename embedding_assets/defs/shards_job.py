"""`<source>_sync_shards`: one run for every shard that has work.

A run of the per-shard asset job pays a Dagster run, store openings and a warm-up per shard;
this op job pays them once and runs the same plain steps (`sync.shard_steps`) and checks
(`sync.shard_checks`) for every shard, with the model loaded once and kept busy: the next
shard is read, chunked and embedded on a helper thread while this one is stored, checked
and indexed on the run's thread (`core.overlap`; Qdrant's embedded store and Dagster's
events stay on the run's thread, in shard order). Each shard still gets
its own events, of its own partition: a materialization of pending_rows, chunks, embeddings
and vector_index with the same figures a per-shard run reports, and its check results, so
the UI's partition view, `status` and the freshness checks read exactly what a per-shard run
leaves. A shard that fails does not stop the others; the run fails at the end, naming it.
The shards are named by the run's tag `embedding_assets/shards`, the generation by
`embedding_assets/generation`.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dagster as dg

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.delta import ChunkedRows, EmbeddedRows
from embedding_assets.core.overlap import overlapped
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.checks import check_evaluation
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.metadata import dagster_metadata
from embedding_assets.defs.resources import SHARDS_TAG, run_generation
from embedding_assets.ops.pools import EMBEDDED_QDRANT_POOL, embedder_pool
from embedding_assets.ops.run_health import IN_PROCESS_JOB_TAG
from embedding_assets.sync import shard_checks, shard_steps
from embedding_assets.sync.embed import QdrantNeeded
from embedding_assets.sync.shard_checks import CheckOutcome

FAILED_SHARDS = "failed_shards"  # the run's failure metadata: {shard key: cause}
ShardEvent = dg.AssetMaterialization | dg.AssetCheckEvaluation


@dataclass(frozen=True)
class _Prepared:
    """A shard read, chunked and embedded, with each step's figures, waiting to be stored."""

    key: str
    embedded: EmbeddedRows | ChunkedRows  # chunked only: to embed on the run's thread
    read_figures: dict
    chunk_figures: dict
    embed_figures: dict


def shards_job_name(source: str) -> str:
    return f"{source}_sync_shards"


def build_shards_job(spec: SourceSpec, qdrant_url: str | None) -> dg.JobDefinition:
    name = spec.name
    embedder_key = embedder_resource_key(spec.embedder)

    @dg.op(
        name=f"{name}_sync_shards_op",
        required_resource_keys={"runtime", embedder_key},
        # The embedded store admits one process at a time; a server, the embedder's limit.
        pool=EMBEDDED_QDRANT_POOL
        if spec.qdrant.enabled and not qdrant_url
        else (embedder_pool(spec.embedder)),
        tags={"kind": "python"},
        out={},  # no output: the op yields each shard's events
    )
    def sync_shards(context: dg.OpExecutionContext) -> Iterator[ShardEvent]:
        """Yields each shard's events as soon as the shard is done (events only logged
        would reach the event log when the op returns: none would if a shard failed)."""
        keys = [k for k in context.run.tags.get(SHARDS_TAG, "").split(",") if k]
        unknown = sorted(set(keys) - set(spec.shard_keys))
        if unknown:
            raise dg.Failure(f"source {name!r} has no shards {unknown}; it has {spec.shard_keys}")
        embedder = getattr(context.resources, embedder_key).embedder()
        generation = run_generation(context.run.tags)
        keys = keys or spec.shard_keys
        sample = shard_checks.sample_per_shard(len(keys))
        budget = shard_checks.SearchBudget()
        # Privileges and edits of sources.yaml, once, before any shard is read: a missing
        # grant fails the whole run before any embedding.
        shard_steps.check_before_reading(
            context.resources.runtime.source(name, embedder, generation), context.log
        )
        runtimes = {}

        def runtime_for(key: str):  # on this thread: it may register a generation in Qdrant
            runtimes[key] = context.resources.runtime.source(name, embedder, generation)
            return key

        failed: dict[str, str] = {}
        events: list[ShardEvent] = []  # the finishing shard's, yielded when it is done
        for outcome in overlapped(
            keys,
            lambda key: _prepare_shard(context, runtimes[key], key),
            lambda key, prepared: _finish_shard(
                context, spec, runtimes[key], prepared, (sample, budget), events.append
            ),
            before_prepare=runtime_for,
        ):
            yield from events
            events.clear()
            key = outcome.key
            if key in runtimes:
                runtimes.pop(key).release_shard(shard_index(key))
            if outcome.error is not None:  # the other shards go on; the run fails at the end
                error = outcome.error
                cause = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
                context.log.error(f"shard {key} of {name} failed: {cause}")
                failed[key] = cause
        if failed:
            raise dg.Failure(
                f"shards {sorted(failed)} of source {name!r} failed: "
                + "; ".join(f"{k}: {v}" for k, v in sorted(failed.items())),
                metadata={FAILED_SHARDS: dg.MetadataValue.json(failed)},
            )

    @dg.job(
        name=shards_job_name(name),
        description=f"Bring every shard of source {name!r} named by the run's "
        f"`{SHARDS_TAG}` tag (default: all) up to date, in one run.",
        tags={IN_PROCESS_JOB_TAG: name},
        executor_def=dg.in_process_executor,
    )
    def shards_job():
        sync_shards()

    return shards_job


def _prepare_shard(context: dg.OpExecutionContext, runtime, key: str) -> _Prepared:
    """On the helper thread: read, chunk and embed the shard (nothing here opens Qdrant)."""
    shard = shard_index(key)
    pending, read_figures = shard_steps.read_pending(
        runtime, shard, context.log, key, check_config=False
    )
    chunked, chunk_figures = shard_steps.chunk_pending(runtime, pending)
    try:
        embedded, embed_figures = shard_steps.embed_pending(
            runtime, chunked, context.log, from_qdrant=False
        )
    except QdrantNeeded:  # a restore from Qdrant: embedded on the run's thread instead
        return _Prepared(key, chunked, read_figures, chunk_figures, {})
    return _Prepared(key, embedded, read_figures, chunk_figures, embed_figures)


def _finish_shard(
    context: dg.OpExecutionContext,
    spec: SourceSpec,
    runtime,
    prepared: _Prepared,
    sampling: tuple[int, shard_checks.SearchBudget],
    emit: Callable[[ShardEvent], None],
) -> None:
    """On the run's thread, in shard order: store, check, index, and `emit` the shard's
    events (its own partition's materializations and check results) as they happen, so
    those before a failure are kept."""
    key, log, embedded = prepared.key, context.log, prepared.embedded
    shard = shard_index(key)
    _yield_qdrant(runtime, log)  # the lane may have waited while this shard was embedded
    emit(_materialized(spec, "pending_rows", key, prepared.read_figures))
    emit(_materialized(spec, "chunks", key, prepared.chunk_figures))
    figures = prepared.embed_figures
    if isinstance(embedded, ChunkedRows):  # its vectors are to be restored from Qdrant
        embedded, figures = shard_steps.embed_pending(runtime, embedded, log)
    figures = {**figures, **shard_steps.store(runtime, embedded, log)}
    emit(_materialized(spec, "embeddings", key, figures))
    # Checks bounded by what the run changed: validity and self-retrieval of the rows it
    # wrote, parity by counts (the deep checksum is O(shard): runs of one shard, reconcile).
    written = embedded.pending.rows["row_id"].tolist()
    valid = True
    for check, evaluate in shard_checks.ON_EMBEDDINGS.items():
        if check == "vectors_valid":
            outcome = shard_checks.vectors_valid(runtime, shard, written)
            valid = outcome.passed
        else:
            outcome = evaluate(runtime, shard)
        emit(_evaluated(spec, "embeddings", check, key, outcome))
    index_asset = "vector_index" if spec.qdrant.enabled else "embeddings"
    if spec.qdrant.enabled:
        if not valid:  # the blocking check: as a per-shard run, no Qdrant write after it
            raise dg.Failure(f"shard {key}: vectors_valid failed; Qdrant is not written")
        update, figures = shard_steps.plan_index(runtime, shard)
        figures.update(
            shard_steps.apply_index(
                runtime, update, log, server=bool(context.resources.runtime.qdrant.url)
            )
        )
        emit(_materialized(spec, "vector_index", key, figures))
    for check, evaluate in shard_checks.ON_INDEX.items():
        if check in shard_checks.QDRANT_ONLY and not spec.qdrant.enabled:
            continue
        if check == "self_retrieval":
            outcome = _self_retrieval(runtime, shard, written, *sampling)
        elif check == "pgvector_qdrant_parity":
            outcome = shard_checks.parity(runtime, shard, deep=False)
        else:
            outcome = evaluate(runtime, shard)
        emit(_evaluated(spec, index_asset, check, key, outcome))
    _yield_qdrant(runtime, log)


def _yield_qdrant(runtime, log) -> None:
    """Between shards, hand the embedded Qdrant collection to whoever waits for it (the
    live lane, `search`): it reopens on this run's next use (DESIGN: one owner at a time)."""
    released = runtime.qdrant.store.yield_to_waiters()
    if released:
        log.debug(f"let another process have embedded Qdrant collections {released}")


def _self_retrieval(
    runtime, shard: int, written: list[str], sample: int, budget: shard_checks.SearchBudget
) -> CheckOutcome:
    """The shard's sample, while the run's search budget lasts; after, none (and why)."""
    if not budget.left:
        outcome = shard_checks.self_retrieval(runtime, shard, 0, written)
        skipped = f"the run spent its {budget.seconds:g} s of self-retrieval searches"
        return CheckOutcome(outcome.passed, {**outcome.metadata, "skipped": skipped})
    started = time.perf_counter()
    outcome = shard_checks.self_retrieval(runtime, shard, sample, written)
    budget.spend(time.perf_counter() - started)
    return outcome


def _materialized(spec: SourceSpec, stage: str, key: str, figures: dict) -> ShardEvent:
    return dg.AssetMaterialization(
        asset_key=[spec.name, stage], partition=key, metadata=dagster_metadata(figures)
    )


def _evaluated(spec, stage: str, check: str, key: str, outcome: CheckOutcome) -> ShardEvent:
    return check_evaluation(dg.AssetKey([spec.name, stage]), check, key, outcome)
