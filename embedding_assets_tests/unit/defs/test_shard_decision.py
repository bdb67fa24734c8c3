"""The sensor's per-shard decision, as the pure function it is: which shard with work gets a run
request, under which run key, and why the others wait."""

import datetime as dt
from types import SimpleNamespace

import dagster as dg

from embedding_assets.defs.sensors import WORK_TAG, retry_wait, shard_decision
from embedding_assets.ops.run_health import WORKER_LOST_TAG
from embedding_assets.state.diff import ShardWork

GENERATION = SimpleNamespace(number=2, state="live")
WORK = ShardWork(shard=3, pending_rows=40, qdrant_lag_rows=5, fingerprint="f1")
WORK_ID = "docs:g2:3:f1"
NOW = 1_000_000.0


def run(status: dg.DagsterRunStatus, ended: float, lost: bool = False) -> SimpleNamespace:
    tags = {WORK_TAG: WORK_ID, **({WORKER_LOST_TAG: "true"} if lost else {})}
    return SimpleNamespace(
        dagster_run=SimpleNamespace(tags=tags, status=status),
        end_time=ended,
        update_timestamp=dt.datetime.fromtimestamp(ended, dt.UTC),
    )


def decide(work=WORK, busy=frozenset(), budget=None, runs=(), now=NOW):
    return shard_decision("docs", GENERATION, "3", work, set(busy), budget, list(runs), now)


def test_new_work_gets_a_request_tagged_with_its_work() -> None:
    decision = decide()
    assert decision.request is not None
    assert decision.request.partition_key == "3"
    assert decision.request.tags[WORK_TAG] == WORK_ID
    assert decision.request.tags["embedding_assets/pending_rows"] == "40"
    assert decision.line == "g2/3: 40 rows pending, 5 rows Qdrant lacks"


def test_the_same_work_gets_the_same_key_and_new_work_a_new_one() -> None:
    assert decide().request.run_key == decide().request.run_key
    changed = ShardWork(shard=3, pending_rows=41, qdrant_lag_rows=5, fingerprint="f2")
    assert decide(work=changed).request.run_key != decide().request.run_key


def test_a_shard_in_flight_waits_whatever_started_the_run() -> None:
    assert decide(busy={("2", "3")}).request is None
    # A run started from the UI has no generation tag: it may be on any generation.
    untagged = decide(busy={(None, "3")})
    assert untagged.request is None and untagged.line == "g2/3 (run in flight)"
    assert decide(busy={("1", "3")}).request is not None


def test_a_spent_budget_holds_embedding_but_not_a_qdrant_catch_up() -> None:
    waiting = decide(work=ShardWork(3, 40, 0, "f1"), budget="openai")
    assert waiting.request is None
    assert "tomorrow's token budget of embedder 'openai'" in waiting.line
    assert decide(budget="openai").request is not None  # 5 rows Qdrant lacks need no tokens


def test_a_failed_run_backs_off_then_retries_under_a_new_key() -> None:
    failed = run(dg.DagsterRunStatus.FAILURE, ended=NOW - 1)
    backing_off = decide(runs=[failed])
    assert backing_off.request is None and "failed 1x, retry in" in backing_off.line
    retried = decide(runs=[failed], now=NOW - 1 + retry_wait(1) + 1)
    assert retried.request is not None
    assert retried.request.run_key != decide().request.run_key


def test_a_run_whose_process_died_is_retried_at_once_under_a_new_key() -> None:
    lost = run(dg.DagsterRunStatus.FAILURE, ended=NOW - 1, lost=True)
    decision = decide(runs=[lost])
    assert decision.request is not None
    assert decision.request.run_key != decide().request.run_key


def test_failed_work_goes_again_at_once_when_the_embedder_answers_after_an_outage() -> None:
    from embedding_assets.sync.outage import EmbedderHealth

    failed = [run(dg.DagsterRunStatus.FAILURE, ended=NOW - 10)]
    waiting = decide(runs=failed)
    assert waiting.request is None and waiting.backing_off
    health = EmbedderHealth()
    health.probe(NOW - 5, lambda: False)  # down after the failure
    assert shard_decision(
        "docs", GENERATION, "3", WORK, set(), None, failed, NOW, health
    ).backing_off
    health.probe(NOW, lambda: True)  # and answering again
    retried = shard_decision("docs", GENERATION, "3", WORK, set(), None, failed, NOW, health)
    assert retried.request is not None and retried.request.run_key.endswith(":1")
    # A failure after the embedder came back keeps its backoff.
    later = [run(dg.DagsterRunStatus.FAILURE, ended=NOW + 1)]
    assert shard_decision(
        "docs", GENERATION, "3", WORK, set(), None, later, NOW + 2, health
    ).backing_off
