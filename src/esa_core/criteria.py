"""The guide's success criteria as rows: criterion, measured value, threshold, verdict.

Every phase adds rows of the same shape through `check`, so the end-of-run table and the
manifest's `success_criteria` list read alike whichever stages ran. A criterion whose stage did
not run is a SKIP that says how to run it, never a silent PASS or FAIL.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
JACCARD_MEAN_MIN = 0.3
JACCARD_STD_MAX = 0.15
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq,
}


def check(criterion: str, value: Any, op: str, threshold: Any, note: str = "") -> dict[str, Any]:
    """One row: PASS when `value op threshold` holds, FAIL when not, SKIP when value is None."""
    if value is None:
        verdict = SKIP
    else:
        verdict = PASS if _OPS[op](value, threshold) else FAIL
    return {"criterion": criterion, "value": value, "threshold": f"{op} {threshold}",
            "verdict": verdict, "note": note}


def skipped(criterion: str, op: str, threshold: Any, note: str) -> dict[str, Any]:
    """A row for a criterion whose stage did not run; the note says how to run it."""
    return check(criterion, None, op, threshold, note)


def phase2(stability: dict[str, Any] | None, stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 2 (sensitivity discovery): a stable top-k set and a heavy-tailed distribution.

    `stability` is stability_summary.json's content, a `{"skipped": note}`, or None when
    --stability-check was not given; a data-free metric's summary skips the rows too.
    `stats` is sensitivity_stats.json's content.
    """
    if stability is None:
        note = "run with --stability-check and two or more --seeds"
    else:  # a skipped check, or a data-free metric whose seeds agree by construction
        note = stability.get("skipped") or stability.get("data_free_note")
    if note:
        rows = [skipped("stability: jaccard_mean", ">", JACCARD_MEAN_MIN, note),
                skipped("stability: jaccard_std", "<", JACCARD_STD_MAX, note)]
    else:
        pairs = f"{len(stability['jaccard_all'])} seed pairs, top-{stability['topk']}"
        rows = [check("stability: jaccard_mean", stability["jaccard_mean"], ">",
                      JACCARD_MEAN_MIN, pairs),
                check("stability: jaccard_std", stability["jaccard_std"], "<",
                      JACCARD_STD_MAX, pairs)]
    tail = stats["global"]
    rows.append(check("heavy tail: heavy_tailed", tail["heavy_tailed"], "==", True,
                      stats["heavy_tail_rule"]))
    return rows


def consistency(jaccard_matrix: list[list[float]]) -> list[dict[str, Any]]:
    """Consistency across runs (`esa compare`): the mean pairwise Jaccard of their top-k sets,
    held to the guide's seed-stability threshold."""
    n = len(jaccard_matrix)
    off = [jaccard_matrix[i][j] for i in range(n) for j in range(i + 1, n)]
    return [check("consistency across runs: jaccard_mean", sum(off) / len(off), ">",
                  JACCARD_MEAN_MIN, f"{len(off)} pairs of runs")]


def table(rows: list[dict[str, Any]]) -> str:
    """A short fixed-width table for the terminal."""
    def shown(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = ("criterion", "value", "threshold", "verdict")
    cells = [header] + [(r["criterion"], shown(r["value"]), r["threshold"], r["verdict"])
                        for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                     for row in cells)
