"""study.json: the study's answer, computed from the cells' files alone (no model is loaded).

Cells are compared along one grid key at a time, holding the others fixed: along `metric`
(consistency, the guide's Phase 2 criterion), along `dataset` (domain dependence) and along
`model` (scaling, and MoE against dense). A weight is (param, expert, row, col) as in
top_weights.csv. Nothing here depends on when or where a cell ran, so a resumed study and an
uninterrupted one give the same file.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from esa_core import criteria
from esa_core.api import GRAD, HVP
from esa_core.layout import RunFiles
from esa_core.plugins import Registry
from esa_core.stability import jaccard, rank_correlation
from esa_core.study.spec import CELLS, Study

#: the guide's Phase 2 threshold, used for agreement across gradient-based metrics too
CONSISTENCY_MIN = criteria.JACCARD_MEAN_MIN
CONSISTENCY = "consistency across gradient-based metrics (mean pairwise Jaccard of top-k)"
SPEARMAN_NOTE = ("Spearman over the union of the two top-k sets; a weight outside a metric's "
                 "top-k ranks below all of that metric's top-k (tied), since its score is not "
                 "in the files.")
DEPTH_NOTE = ("share of the top-k score mass in each layer; normalised depth = layer / number "
              "of layers; weights outside the layers (embed, lm_head) count in the total only")
Weight = tuple[str, Any, int, int]


def weight_of(row: dict[str, Any]) -> Weight:
    return (row["param"], row["expert"], row["row"], row["col"])


def weight_name(w: Weight) -> str:
    param, expert, row, col = w
    return f"{param}[{row}, {col}]" if expert is None else f"{param}[{expert}, {row}, {col}]"


def gradient_based(registry: Registry, metric: str) -> bool:
    """A metric that needs a backward pass (gradients, Hessian-vector products)."""
    cls = registry.metrics.get(metric)
    return cls is not None and bool(set(cls.needs) & {GRAD, HVP})


def answer(study: Study, folder: Path, registry: Registry) -> dict[str, Any]:
    """The whole study.json."""
    runs = {cell.name: RunFiles.read(cell.folder(folder)) for cell in study.cells}
    found = {
        "name": study.name,
        "grid": study.grid,
        "run": study.run,
        "cells": [_cell_row(cell, runs[cell.name]) for cell in study.cells],
        "consistency": _along(study, runs, "metric",
                              lambda group: _consistency(group, registry)),
        "domains": _along(study, runs, "dataset", _domains),
        "scaling": {"depth_note": DEPTH_NOTE,
                    "rows": [_scaling_row(cell.values, runs[cell.name]) for cell in study.cells]},
        "architecture": {"rows": [_architecture_row(cell.values, runs[cell.name])
                                  for cell in study.cells]},
    }
    found["success_criteria"] = [g["criterion"] for g in found["consistency"].get("groups", [])]
    found["summary"] = summary(found)
    return found


def _cell_row(cell, run: RunFiles) -> dict[str, Any]:
    model = run.manifest.get("model", {})
    return {"index": cell.index, "name": cell.name, "folder": f"{CELLS}/{cell.name}",
            "values": cell.values, "model": model.get("id"), "model_type": model.get("model_type"),
            "n_params": model.get("n_params"), "metric": run.config.get("metric"),
            "dataset": run.config.get("dataset"), "topk": run.config.get("topk"),
            "mode": run.config.get("mode"), "n_top": len(run.top)}


def groups_along(study: Study, axis: str) -> list[tuple[dict[str, Any], list]]:
    """The cells grouped by every grid key but `axis`, each group in the axis's order."""
    groups: dict[str, tuple[dict[str, Any], list]] = {}
    for cell in study.cells:
        fixed = {k: v for k, v in cell.values.items() if k != axis}
        groups.setdefault(repr(fixed), (fixed, []))[1].append(cell)
    return list(groups.values())


def _along(study: Study, runs: dict[str, RunFiles], axis: str, compare) -> dict[str, Any]:
    if len(study.grid.get(axis, [])) < 2:
        return {"skipped": f"the grid has fewer than two values of '{axis}'"}
    return {"axis": axis, "groups": [
        {"fixed": fixed, **compare([(str(c.values[axis]), runs[c.name]) for c in cells])}
        for fixed, cells in groups_along(study, axis)]}


def _tops(group: list[tuple[str, RunFiles]]) -> list[dict[Weight, float]]:
    return [{weight_of(r): r["score"] for r in run.top} for _, run in group]


def _jaccard_matrix(tops: list[dict[Weight, float]]) -> list[list[float]]:
    return [[jaccard(a, b) for b in tops] for a in tops]


def union_spearman(a: dict[Weight, float], b: dict[Weight, float]) -> float | None:
    """Spearman of two top-k score sets over their union (see SPEARMAN_NOTE)."""
    union = sorted(a.keys() | b.keys(), key=repr)

    def column(scores: dict[Weight, float]) -> np.ndarray:
        below = min(scores.values()) - 1.0 - abs(min(scores.values()))
        return np.array([scores.get(w, below) for w in union], dtype=np.float64)

    return rank_correlation(column(a), column(b)) if a and b else None


def _consistency(group: list[tuple[str, RunFiles]], registry: Registry) -> dict[str, Any]:
    labels, tops = [label for label, _ in group], _tops(group)
    jac = _jaccard_matrix(tops)
    rho = [[1.0 if i == j else union_spearman(a, b) for j, b in enumerate(tops)]
           for i, a in enumerate(tops)]
    grad = [i for i, label in enumerate(labels) if gradient_based(registry, label)]
    pairs = [jac[i][j] for n, i in enumerate(grad) for j in grad[n + 1:]]
    value = float(np.mean(pairs)) if pairs else None
    names = ", ".join(labels[i] for i in grad)
    note = (f"over {len(pairs)} pairs of {names}" if pairs else
            "needs two gradient-based metrics in the grid (e.g. grad_x_weight, grad_squared)")
    return {"metrics": labels, "jaccard": jac, "spearman": rho, "spearman_note": SPEARMAN_NOTE,
            "gradient_based": [labels[i] for i in grad],
            "criterion": criteria.check(CONSISTENCY, value, ">", CONSISTENCY_MIN, note)}


def _critical(run: RunFiles) -> list[Weight] | None:
    ablation = run.manifest.get("ablation")
    if not ablation:
        return None
    return [(w["param"], w["expert"], w["row"], w["col"]) for w in ablation["critical_weights"]]


def _domains(group: list[tuple[str, RunFiles]]) -> dict[str, Any]:
    labels, tops = [label for label, _ in group], _tops(group)
    sets = [set(t) for t in tops]
    general = set.intersection(*sets)
    only = {label: len(s - set().union(*(o for o in sets if o is not s)))
            for label, s in zip(labels, sets)}
    found = {"datasets": labels, "jaccard": _jaccard_matrix(tops),
             "domain_general": len(general), "only_in_one": only,
             "topk_sizes": [len(s) for s in sets]}
    critical = [_critical(run) for _, run in group]
    if all(c is not None for c in critical):
        found["critical_weights"] = {
            "by_dataset": {label: [weight_name(w) for w in c]
                           for label, c in zip(labels, critical)},
            "same": all(set(c) == set(critical[0]) for c in critical)}
    return found


def _layers(run: RunFiles) -> int | None:
    """Number of transformer blocks: one more than the deepest scored matrix's layer."""
    layers = [m["layer"] for m in (run.stats or {}).get("per_layer", {}).values()
              if m.get("layer") is not None]
    return max(layers) + 1 if layers else None


def _scaling_row(values: dict[str, Any], run: RunFiles) -> dict[str, Any]:
    glob = (run.stats or {}).get("global", {})
    total = sum(r["score"] for r in run.top)
    by_component: dict[str, float] = defaultdict(float)
    by_layer: dict[int, float] = defaultdict(float)
    for r in run.top:
        by_component[r["component"]] += r["score"]
        if r["layer"] is not None:
            by_layer[r["layer"]] += r["score"]
    n_layers = _layers(run)

    def share(mass: float) -> float | None:
        return mass / total if total > 0 else None

    row: dict[str, Any] = {
        "values": values, "model": run.manifest.get("model", {}).get("id"),
        "n_params": run.manifest.get("model", {}).get("n_params"),
        "metric": run.config.get("metric"), "dataset": run.config.get("dataset"),
        "hill_tail_index": glob.get("hill_tail_index"),
        "excess_kurtosis": glob.get("excess_kurtosis"),
        "heavy_tailed": glob.get("heavy_tailed"),
        "component_share": {c: share(m) for c, m in sorted(by_component.items())},
        "n_layers": n_layers,
        "depth_profile": None if n_layers is None else {
            "depth": [layer / n_layers for layer in range(n_layers)],
            "share": [share(by_layer.get(layer, 0.0)) for layer in range(n_layers)]},
    }
    critical = _critical(run)
    if critical is not None:
        layer_of = {weight_of(r): r["layer"] for r in run.top}
        row["critical_weights"] = {
            "count": len(critical),
            "depth": [None if n_layers is None or layer_of.get(w) is None
                      else layer_of[w] / n_layers for w in critical]}
    tables = {name: _marked(table, n_layers)
              for name, table in ((run.stats or {}).get("findings") or {}).items()}
    if tables:
        row["findings"] = tables
    return row


def _marked(table: dict[str, Any], n_layers: int | None) -> dict[str, Any]:
    """A metric's findings table as the study shows it: its marked rows (every row when it
    marks none), each with its normalised depth where the row names a layer."""
    mark = table.get("mark")
    columns = [c["name"] for c in table["columns"] if c["name"] != mark]
    rows = [r for r in table["rows"] if mark is None or r[mark]]
    return {"title": table["title"], "columns": columns,
            "rows": [{**{c: r[c] for c in columns},
                      "depth": None if n_layers is None or r.get("layer") is None
                      else r["layer"] / n_layers} for r in rows]}


def gini(values: list[float]) -> float | None:
    """Gini coefficient of non-negative values: 0 when even, (n-1)/n when all in one."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n, total = len(x), float(x.sum())
    if n == 0 or total <= 0:
        return None
    return float(2 * np.sum(np.arange(1, n + 1) * x) / (n * total) - (n + 1) / n)


def _architecture_row(values: dict[str, Any], run: RunFiles) -> dict[str, Any]:
    """Dense or MoE; for MoE, where the top-k mass sits among the experts and whether it follows
    the router's load (both per (layer, expert), over the MoE layers)."""
    load = ((run.stats or {}).get("router_load") or {}).get("per_layer", {})
    in_experts = [r for r in run.top if r["expert"] is not None]
    total = sum(r["score"] for r in run.top)
    row: dict[str, Any] = {"values": values, "model": run.manifest.get("model", {}).get("id"),
                           "model_type": run.manifest.get("model", {}).get("model_type"),
                           "architecture": "moe" if load or in_experts else "dense",
                           "expert_share": (sum(r["score"] for r in in_experts) / total
                                            if total > 0 else None)}
    if not load:
        return row
    mass: dict[tuple[int, int], float] = defaultdict(float)
    for r in in_experts:
        mass[(r["layer"], r["expert"])] += r["score"]
    keys = [(int(name.rsplit(".", 1)[-1]), e) for name, counts in sorted(load.items())
            for e in range(len(counts))]
    masses = [mass.get(k, 0.0) for k in keys]
    tokens = [load[f"layers.{layer}"][e] for layer, e in keys]
    row.update(n_experts_total=len(keys), expert_gini=gini(masses),
               spearman_mass_vs_router_load=rank_correlation(np.array(masses),
                                                             np.array(tokens, dtype=float)))
    return row


def summary(found: dict[str, Any]) -> list[str]:
    """The plain-language answer: which criteria held, what changed with size, domain and
    architecture."""
    lines = []
    for group in found["consistency"].get("groups", []):
        c, where = group["criterion"], _where(group["fixed"])
        if c["verdict"] == criteria.SKIP:
            lines.append(f"Consistency{where}: not judged ({c['note']}).")
        else:
            held = "agree" if c["verdict"] == criteria.PASS else "do not agree"
            lines.append(f"Consistency{where}: the gradient-based metrics {held} "
                         f"(mean Jaccard {c['value']:.2f}, needs > {CONSISTENCY_MIN}).")
    for group in found["domains"].get("groups", []):
        jac = group["jaccard"]
        pairs = [jac[i][j] for i in range(len(jac)) for j in range(i + 1, len(jac))]
        spread = (f"{min(pairs):.2f}" if min(pairs) == max(pairs) else
                  f"{min(pairs):.2f}-{max(pairs):.2f}")
        lines.append(f"Domains{_where(group['fixed'])}: the top-k sets of "
                     f"{' and '.join(group['datasets'])} overlap by Jaccard {spread}; "
                     f"{group['domain_general']} weights are "
                     f"in every domain's top-k, "
                     + ", ".join(f"{n} only in {d}" for d, n in group["only_in_one"].items())
                     + "." + _critical_line(group))
    lines += _scaling_lines(found["scaling"]["rows"])
    for row in found["architecture"]["rows"]:
        if row["architecture"] == "moe" and row.get("expert_gini") is not None:
            rho = row.get("spearman_mass_vs_router_load")
            lines.append(f"MoE {row['model']} ({_where(row['values']).strip(' ,()')}): "
                         f"{row['expert_share']:.0%} of the top-k mass is in experts, Gini "
                         f"{row['expert_gini']:.2f} over {row['n_experts_total']} experts; "
                         "Spearman with router load "
                         + ("undefined" if rho is None else f"{rho:.2f}") + ".")
    return lines


def _critical_line(group: dict[str, Any]) -> str:
    critical = group.get("critical_weights")
    if not critical:
        return ""
    return (" The critical weights are the same in every domain." if critical["same"] else
            " The critical weights differ between domains.")


def _scaling_lines(rows: list[dict[str, Any]]) -> list[str]:
    """From the smallest to the largest model, per (everything but the model): the tail and
    where the top-k mass peaks."""
    by_rest: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        rest = {k: v for k, v in row["values"].items() if k != "model"}
        by_rest[repr(rest)].append(row)
    lines = []
    for group in by_rest.values():
        models = sorted(group, key=lambda r: r["n_params"] or 0)
        if len({r["n_params"] for r in models}) < 2:
            continue
        small, large = models[0], models[-1]
        rest = {k: v for k, v in small["values"].items() if k != "model"}
        lines.append(f"Scaling{_where(rest)}: from {small['model']} ({small['n_params']:,} "
                     f"parameters) to {large['model']} ({large['n_params']:,}), the tail index "
                     f"goes {_num(small['hill_tail_index'])} -> {_num(large['hill_tail_index'])}, "
                     f"the kurtosis {_num(small['excess_kurtosis'])} -> "
                     f"{_num(large['excess_kurtosis'])}, and the top-k mass peaks at depth "
                     f"{_peak(small)} -> {_peak(large)}.")
    return lines


def _peak(row: dict[str, Any]) -> str:
    profile = row["depth_profile"]
    if not profile or not any(s for s in profile["share"] if s):
        return "n/a"
    i = int(np.argmax([s or 0.0 for s in profile["share"]]))
    return f"{profile['depth'][i]:.2f}"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _where(fixed: dict[str, Any]) -> str:
    return f" ({', '.join(f'{k} {v}' for k, v in fixed.items())})" if fixed else ""
