"""The reports the commands print, and how they print: one place for the text a person reads (the
--json output is the reports as they are)."""

from dataclasses import dataclass
from typing import Any


@dataclass
class ShardReport:
    source: str
    shard: str
    success: bool
    rows: int = 0
    rows_deleted: int = 0
    chunks: int = 0
    embedded_chunks: int = 0
    reused_chunks: int = 0
    points_upserted: int = 0
    failed_rows: int = 0  # rows the embedder failed on: in the error table, retried later
    rows_waiting_for_budget: int = 0  # left pending: the embedder's daily tokens are spent
    seconds: float = 0.0
    index_build_seconds: float = 0.0  # the pgvector HNSW build after a bulk load, if this run
    error: str | None = None
    generation: int | None = None
    generation_state: str | None = None  # before the run: live, building (a build's runs)
    promoted_generation: int | None = None  # this run finished a build that went live
    promotion_blocked: str | None = None


def describe_audit(audit) -> str:
    parts = []
    if not audit.pgvector_consistent:
        parts.append(
            f"pgvector holds {audit.pgvector_chunks} chunks, the ledger {audit.ledger_chunks} "
            f"({audit.rows_marked_lost} rows to restore, {audit.orphan_chunks_removed} stray "
            "chunks removed)"
        )
    if audit.qdrant_points is not None and audit.qdrant_points != audit.ledger_points:
        parts.append(
            f"Qdrant holds {audit.qdrant_points} of {audit.ledger_points} points (shard resent)"
        )
    return "; ".join(parts)


def shard_line(report: ShardReport) -> str:
    if not report.success:
        status = f"FAILED: {report.error}"
    elif report.failed_rows:
        status = f"{report.failed_rows} rows FAILED (see `embedding-assets errors`)"
    else:
        status = "ok"
    if report.rows_waiting_for_budget:
        status += (
            f"; {report.rows_waiting_for_budget} rows wait for the embedder's daily token "
            "budget (pending, not failed)"
        )
    if report.promoted_generation is not None:
        status += f"; generation {report.promoted_generation} is live now"
    elif report.promotion_blocked:
        status += f"; generation {report.generation} is not promoted: {report.promotion_blocked}"
    building = f" [building g{report.generation}]" if report.generation_state == "building" else ""
    return (
        f"{report.source}/{report.shard}{building}: {report.rows} rows, "
        f"{report.rows_deleted} deleted, "
        f"{report.chunks} chunks ({report.embedded_chunks} embedded, {report.reused_chunks} "
        f"reused), {report.points_upserted} points, {report.seconds}s  {status}"
    )


def id_warnings(report: dict, id_column: str) -> list[str]:
    """What status says of rows it cannot track: NULL ids and duplicated ids."""
    warnings = []
    if report["null_id_rows"]:
        warnings.append(
            f"{report['null_id_rows']} eligible rows have a NULL `{id_column}` and are never "
            "embedded; give them an id, or leave them out with `where:`"
        )
    if report["duplicate_ids"]:
        warnings.append(
            f"ids shared by several rows (not updated until only one row has each): "
            f"{report['duplicate_ids']}; see `embedding-assets errors`"
        )
    return warnings


def generation_line(report: dict[str, Any]) -> str:
    coverage = report.get("coverage")
    shown = f"{coverage:.1%}" if isinstance(coverage, float) else "-"
    line = (
        f"generation {report['number']} [{report['state']}] {report['model']}  coverage "
        f"{shown}  created {report['created_at']}"
    )
    if report.get("promoted_at"):
        line += f"  promoted {report['promoted_at']}"
    if report.get("blocked_reason") and report["state"] == "building":
        line += f"\n      not promoted: {report['blocked_reason']}"
    elif report["state"] == "building" and report["promote"] == "manual":
        line += "  (promote: manual)"
    return line
