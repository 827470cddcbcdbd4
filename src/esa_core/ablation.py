"""--ablate-top N: which of the top-ranked weights, removed alone, break the model?

A metric's score predicts; removal measures. Each of the N highest-ranked weights (in
top_weights.csv order) is removed alone with the perturbation that declares `removes` (zero),
the model is measured by the run's evaluators on the ablation blocks, and the weight is
restored bit-exactly (on the bench the perturbation study uses). ablation.csv ranks the
candidates by the measured damage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from scipy import stats

from esa_core import intervals
from esa_core.analysis import damage
from esa_core.api import RELATIVE, Measure, Perturbation
from esa_core.bench import Bench
from esa_core.indices import evenly_spaced
from esa_core.layout import ABLATION, CSV_COLUMNS
from esa_core.perturbation import generator_for, perturbed
from esa_core.results import write_csv
from esa_core.selection import Picks, Selection


def change_column(measure: Measure) -> str:
    """The column holding a measure's change: its ratio (relative) or its change_name."""
    return f"{measure.name}_ratio" if measure.change == RELATIVE else measure.change_name


def columns(measures: Sequence[Measure]) -> list[str]:
    """ablation.csv's columns: the top_weights.csv ones with score_rank, then per measure its
    value and ratio (relative change) or its change (difference), e.g. `loss,loss_ratio`, each
    change with its interval over the evaluation items (`loss_ratio_ci_low,loss_ratio_ci_high`;
    empty where the evaluator gives no per-item values)."""
    at = CSV_COLUMNS.index("score")
    cols = [*CSV_COLUMNS[:at], "score_rank", *CSV_COLUMNS[at:]]
    for m in measures:
        change = change_column(m)
        cols += [m.name] if m.change == RELATIVE else []
        cols += [change, f"{change}_ci_low", f"{change}_ci_high"]
    return cols


def _ratio(value: Any, baseline: Any) -> Any:
    return value / baseline


def harm_ratio(measure: Measure, value: float | None, baseline: float) -> float:
    """How many times worse: value / baseline for a lower-is-better measure, else the inverse."""
    if value is None or math.isnan(value):
        return math.inf
    num, den = (baseline, value) if measure.higher_is_better else (value, baseline)
    return num / den if den else math.inf


def one_weight(picks: Picks, i: int) -> Selection:
    return Selection([Picks(picks.matrix, picks.rows[i:i + 1], picks.cols[i:i + 1],
                            picks.scores[i:i + 1])])


def ablation_blocks(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """`n` of the held-out blocks, spread evenly over them (all of them when n >= len)."""
    if n >= len(blocks):
        return blocks
    return blocks[evenly_spaced(len(blocks), n)]


def run(bench: Bench, remover: Perturbation, selection: Selection,
        top_rows: Sequence[Mapping[str, Any]], n: int, critical_ratio: float,
        out_dir: Path) -> dict[str, Any]:
    """Ablate the top `n` weights one at a time with the rule `remover`; write ablation.csv;
    return the manifest entry.

    `bench` measures on the ablation blocks (`ablation_blocks`); each candidate is one unit.
    """
    measures = bench.measures
    primary = measures[0]
    baseline = bench.baseline("ablate_baseline")
    rows = []
    for (picks, i), top in zip(selection.ranked()[:n], top_rows):
        one = one_weight(picks, i)
        result = bench.trial(
            f"ablate_{top['rank']}", "ablating",
            lambda one=one: perturbed(one, bench.params, remover, generator_for(0, remover.name),
                                      bench.pristine),
            baseline)
        row = {k: top[k] for k in CSV_COLUMNS if k != "rank"}
        row["score_rank"] = top["rank"]
        for m in measures:
            if m.change == RELATIVE:
                row[m.name] = result[m.name]
                ratio = None if result[m.name] is None else result[m.name] / baseline[m.name]
                row[f"{m.name}_ratio"] = ratio
            else:
                row[m.change_name] = result[m.change_name]
            ci = intervals.paired_interval(m, baseline, [result],
                                           of=_ratio if m.change == RELATIVE else None)
            row[f"{change_column(m)}_ci_low"], row[f"{change_column(m)}_ci_high"] = ci or ("", "")
        row["_damage"] = damage(result[primary.change_name])
        row["_harm"] = harm_ratio(primary, result[primary.name], baseline[primary.name])
        rows.append(row)
    rows.sort(key=lambda r: (-r["_damage"], r["score_rank"]))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    write_csv(out_dir / ABLATION, [{k: _text(v) for k, v in r.items()} for r in rows],
              columns(measures))
    return summary(rows, primary, baseline, critical_ratio, len(bench.eval_data.blocks))


def _text(value: Any) -> Any:
    return repr(value) if isinstance(value, float) else value


def summary(rows: list[dict[str, Any]], primary: Measure, baseline: Mapping[str, Any],
            critical_ratio: float, blocks: int) -> dict[str, Any]:
    """The manifest's `ablation` entry: the critical weights and how well the score ordered
    the weights by their measured effect (Spearman over the candidates)."""
    critical = [{"rank": r["rank"], "param": r["param"], "expert": r["expert"], "row": r["row"],
                 "col": r["col"], "score_rank": r["score_rank"], "ratio": r["_harm"]}
                for r in rows if r["_harm"] >= critical_ratio]
    scores = [float(r["score"]) for r in rows]
    effects = [min(r["_damage"], 1e300) for r in rows]  # a broken model ranks highest
    rho = stats.spearmanr(scores, effects) if len(rows) > 2 else None
    return {
        "file": ABLATION, "candidates": len(rows), "eval_blocks": blocks,
        "measure": primary.name, "baseline": {primary.name: baseline[primary.name]},
        "critical_ratio": critical_ratio, "critical_weights": critical,
        "spearman_score_vs_effect": None if rho is None else float(rho.statistic),
        "spearman_p_value": None if rho is None else float(rho.pvalue),
    }
