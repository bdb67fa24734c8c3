"""Retrieval quality of a generation on labelled queries: each query searched once per backend
and mode the generation has, its hits turned into ranked row ids (a row's chunks count once,
at its best rank), scored by `core.retrieval_metrics`. Used by `evaluate` and by the quality
gate before a promotion (`quality_blocker`).

A queries file is JSON lines, `{"query": "...", "relevant": ["<row id>", ...]}`.
"""

import json
import re
from pathlib import Path

from embedding_assets.core.retrieval_metrics import mean_metrics
from embedding_assets.sync.runtime import SourceRuntime

MODES = ("dense", "lexical", "hybrid")
Queries = list[tuple[str, set[str]]]
_METRIC = re.compile(r"^(recall|mrr|ndcg)_at_(\d+)$")


def read_queries(path: Path) -> Queries:
    """The labelled queries; ValueError naming the file, the line and what it lacks."""
    if not path.is_file():
        raise ValueError(f"queries file {path} does not exist")
    queries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            query, relevant = item["query"], item["relevant"]
            if not isinstance(query, str) or not query.strip() or not isinstance(relevant, list):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            raise ValueError(
                f"{path}:{number}: expected a JSON object "
                '{"query": "<text>", "relevant": ["<row id>", ...]}, got: ' + line[:200]
            ) from None
        queries.append((query, {str(r) for r in relevant}))
    if not queries:
        raise ValueError(f"{path} holds no queries (JSON lines of query + relevant)")
    return queries


def backend_modes(runtime: SourceRuntime) -> list[tuple[str, str]]:
    """(backend, mode) pairs the generation can answer, named as `search` names them."""
    pairs = []
    if runtime.spec.pgvector.enabled and runtime.pgvector.table_exists():
        pairs.append(("pgvector", "dense"))
        if runtime.pgvector.has_lexical():
            pairs += [("pgvector", "lexical"), ("pgvector", "hybrid")]
    if runtime.spec.qdrant.enabled:
        pairs.append(("qdrant", "dense"))
        if runtime.qdrant.has_lexical():
            pairs += [("qdrant", "lexical"), ("qdrant", "hybrid")]
    if runtime.column is not None:
        pairs.append(("column", "dense"))
    return pairs


def ranked_rows(runtime: SourceRuntime, backend: str, mode: str, text: str, vector, k: int):
    """Row ids of the query's hits, best first (4k chunks asked: rows have several)."""
    if backend == "pgvector":
        return [h.row_id for h in runtime.pgvector.search(vector, 4 * k, mode=mode, text=text)]
    if backend == "qdrant":
        hits = runtime.qdrant.search(vector, 4 * k, mode=mode, text=text)
        return [str(h.payload.get("row_id")) for h in hits]
    return [str(h["row_id"]) for h in runtime.column.search(vector, k, live=runtime.is_live)]


def evaluate_runtime(
    runtime: SourceRuntime, queries: Queries, k: int, pairs: list[tuple[str, str]]
) -> list[dict]:
    """One result per (backend, mode): recall@k, MRR@k, nDCG@k over the queries."""
    need_vectors = any(mode != "lexical" for _, mode in pairs)
    vectors = [runtime.embedder.embed_query(q) if need_vectors else None for q, _ in queries]
    results = []
    with runtime.qdrant.store.keep_open():  # an embedded collection opened once, not per query
        for backend, mode in pairs:
            runs = [
                (ranked_rows(runtime, backend, mode, query, vector, k), relevant)
                for (query, relevant), vector in zip(queries, vectors, strict=True)
            ]
            metrics = mean_metrics(runs, k)
            results.append(
                {
                    "backend": backend,
                    "mode": mode,
                    "recall_at_k": metrics.recall_at_k,
                    "mrr_at_k": metrics.mrr_at_k,
                    "ndcg_at_k": metrics.ndcg_at_k,
                }
            )
    return results


def parse_metric(name: str) -> tuple[str, int]:
    """`ndcg_at_10` -> ("ndcg_at_k", 10)."""
    found = _METRIC.match(name)
    if found is None:
        raise ValueError(
            f"metric {name!r}: use recall_at_K, mrr_at_K or ndcg_at_K (e.g. ndcg_at_10)"
        )
    return f"{found.group(1)}_at_k", int(found.group(2))


def gate_score(runtime: SourceRuntime, queries: Queries, metric: str) -> tuple[float, str]:
    """The generation's `metric` in the mode readers get by default: hybrid in pgvector
    where it has the full-text column, else dense (pgvector, else Qdrant)."""
    key, k = parse_metric(metric)
    pairs = backend_modes(runtime)
    preferred = [p for p in pairs if p == ("pgvector", "hybrid")] or pairs[:1]
    if not preferred:
        raise ValueError(f"generation {runtime.number} has nothing to search yet")
    (result,) = evaluate_runtime(runtime, queries, k, preferred)
    return float(result[key]), f"{result['backend']} {result['mode']}"


def quality_blocker(building: SourceRuntime, live: SourceRuntime | None) -> str | None:
    """Why `building` may not replace `live` on the configured queries (a drop of the
    metric beyond `max_drop`), with both figures; None when it may, or nothing is set."""
    gate = building.spec.generations.evaluate
    if gate is None or live is None:
        return None
    try:
        queries = read_queries(Path(gate.queries))
        after, how = gate_score(building, queries, gate.metric)
        before, _ = gate_score(live, queries, gate.metric)
    except ValueError as problem:
        return f"retrieval quality not measured: {problem}"
    drop = before - after
    if drop > gate.max_drop:
        return (
            f"retrieval quality dropped: {gate.metric} {after:.4f} against the live "
            f"generation's {before:.4f} ({how}, {len(queries)} queries of {gate.queries}), "
            f"a drop of {drop:.4f} > max_drop {gate.max_drop}"
        )
    return None
