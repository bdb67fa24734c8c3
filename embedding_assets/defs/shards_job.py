"""`<source>_sync_shards`: one run for every shard that has work.

A run of the per-shard asset job pays a Dagster run, store openings and a warm-up per shard;
this op job pays them once and runs the same plain steps (`sync.shard_steps`) and checks
(`sync.shard_checks`) shard after shard, with the model loaded once. Each shard still gets
its own events, of its own partition: a materialization of pending_rows, chunks, embeddings
and vector_index with the same figures a per-shard run reports, and its check results, so
the UI's partition view, `status` and the freshness checks read exactly what a per-shard run
leaves. A shard that fails does not stop the others; the run fails at the end, naming it.
The shards are named by the run's tag `embedding_assets/shards`, the generation by
`embedding_assets/generation`.
"""

import dagster as dg

from embedding_assets.config.sources import SourceSpec
from embedding_assets.core.sharding import shard_index
from embedding_assets.defs.checks import check_evaluation
from embedding_assets.defs.embedder_resources import embedder_resource_key
from embedding_assets.defs.metadata import dagster_metadata
from embedding_assets.defs.resources import SHARDS_TAG, run_generation
from embedding_assets.ops.pools import EMBEDDED_QDRANT_POOL, embedder_pool
from embedding_assets.ops.run_health import IN_PROCESS_JOB_TAG
from embedding_assets.sync import shard_checks, shard_steps
from embedding_assets.sync.shard_checks import CheckOutcome

FAILED_SHARDS = "failed_shards"  # the run's failure metadata: {shard key: cause}


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
    )
    def sync_shards(context: dg.OpExecutionContext) -> None:
        keys = [k for k in context.run.tags.get(SHARDS_TAG, "").split(",") if k]
        unknown = sorted(set(keys) - set(spec.shard_keys))
        if unknown:
            raise dg.Failure(f"source {name!r} has no shards {unknown}; it has {spec.shard_keys}")
        embedder = getattr(context.resources, embedder_key).embedder()
        generation = run_generation(context.run.tags)
        failed: dict[str, str] = {}
        keys = keys or spec.shard_keys
        sample = shard_checks.sample_per_shard(len(keys))
        for key in keys:
            runtime = context.resources.runtime.source(name, embedder, generation)
            try:
                _sync_shard(context, spec, runtime, key, sample)
            except Exception as exc:  # the other shards go on; the run fails at the end
                cause = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                context.log.error(f"shard {key} of {name} failed: {cause}")
                failed[key] = cause
            finally:
                runtime.release_shard(shard_index(key))
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


def _sync_shard(
    context: dg.OpExecutionContext, spec: SourceSpec, runtime, key: str, sample: int
) -> None:
    shard = shard_index(key)
    log = context.log
    pending, figures = shard_steps.read_pending(runtime, shard, log, key)
    _materialized(context, spec, "pending_rows", key, figures)
    chunked, figures = shard_steps.chunk_pending(runtime, pending)
    _materialized(context, spec, "chunks", key, figures)
    embedded, figures = shard_steps.embed_pending(runtime, chunked, log)
    figures.update(shard_steps.store(runtime, embedded, log))
    _materialized(context, spec, "embeddings", key, figures)
    valid = True
    for check, evaluate in shard_checks.ON_EMBEDDINGS.items():
        outcome = evaluate(runtime, shard)
        _evaluated(context, spec, "embeddings", check, key, outcome)
        valid = valid and (check != "vectors_valid" or outcome.passed)
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
        _materialized(context, spec, "vector_index", key, figures)
    for check, evaluate in shard_checks.ON_INDEX.items():
        if check in shard_checks.QDRANT_ONLY and not spec.qdrant.enabled:
            continue
        if check == "self_retrieval":
            outcome = shard_checks.self_retrieval(runtime, shard, sample)
        else:
            outcome = evaluate(runtime, shard)
        _evaluated(context, spec, index_asset, check, key, outcome)


def _materialized(context, spec: SourceSpec, stage: str, key: str, figures: dict) -> None:
    context.log_event(
        dg.AssetMaterialization(
            asset_key=[spec.name, stage], partition=key, metadata=dagster_metadata(figures)
        )
    )


def _evaluated(context, spec, stage: str, check: str, key: str, outcome: CheckOutcome) -> None:
    context.log_event(check_evaluation(dg.AssetKey([spec.name, stage]), check, key, outcome))
