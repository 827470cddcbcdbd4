"""Is sensitivity hierarchical? Layer- and component-wise patterns, judged against a null.

The unit is a logical matrix's score mass per weight (its mean score): every mode has it, while
counts of top-k weights say nothing in per_layer mode (each matrix holds exactly k) and a global
top-k inside a few matrices is concentrated by construction. For layers, and separately for
components, the statistic is the hottest group's mean density, and the effect how many times
it exceeds the mean density of the other matrices. The null: a matrix's density does not
depend on its layer (component), so the densities permuted across matrices, group sizes kept,
are as likely as the observed grouping (`scipy.stats.permutation_test`). Scores independent of
the matrix give exchangeable matrices, which the test then rejects at most 5% of the time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats

from esa_core import criteria
from esa_core.api import LogicalMatrix

P_MAX = 0.05 / 2  # two groupings (layers, components) are tested: Bonferroni
HOTTER = 2.0  # the hottest group: at least twice the other matrices' score mass per weight
PERMUTATIONS = 1999  # p resolves to 1/2000, well below the 0.025 it is held to
RULE = (f"hierarchical = for layers or for components, the hottest group's score mass per "
        f"weight is >= {HOTTER:g}x the other matrices' mean, and p <= {P_MAX:g} (0.05 over "
        "the two groupings) against the null "
        "that a matrix's score mass per weight does not depend on its group (densities "
        "permuted across matrices)")


def densities(scores: Mapping[str, torch.Tensor],
              matrices: Sequence[LogicalMatrix]) -> list[dict[str, Any]]:
    """Each matrix's layer, component and mean score (summed in float64 where it lives)."""
    means = []
    for m in matrices:
        part = m.view(scores[m.param])
        means.append(part.sum(dtype=torch.float64) / part.numel())
    values = torch.stack([v.cpu() for v in means]).tolist() if means else []
    return [{"layer": m.layer, "component": m.component, "density": v}
            for m, v in zip(matrices, values)]


def grouping(rows: Sequence[Mapping[str, Any]], by: str) -> dict[str, Any] | None:
    """The hottest group by `by` (layer or component), its ratio to the other matrices' mean
    density, and the permutation p-value of its mean density;
    None when fewer than two groups exist or every density is zero."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        groups.setdefault(str(r[by]), []).append(float(r["density"]))
    values = [d for g in groups.values() for d in g]
    mean = math.fsum(values) / len(values) if values else 0.0
    if len(groups) < 2 or not mean > 0 or not all(math.isfinite(v) for v in values):
        return None
    # one sample of densities whose order is permuted ("pairings"): position i belongs to
    # group label[i], so a permutation is a regrouping with every group's size kept
    membership = np.zeros((len(values), len(groups)))
    membership[np.arange(len(values)), np.repeat(np.arange(len(groups)),
                                                 [len(g) for g in groups.values()])] = 1.0
    membership /= membership.sum(axis=0)

    def hottest_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.max(np.moveaxis(x, axis, -1) @ membership, axis=-1)

    test = stats.permutation_test((np.asarray(values),), hottest_mean,
                                  permutation_type="pairings", alternative="greater",
                                  vectorized=True, n_resamples=PERMUTATIONS, batch=1000,
                                  rng=np.random.default_rng(0))
    hottest = max(groups, key=lambda name: math.fsum(groups[name]) / len(groups[name]))
    rest = [d for name, g in groups.items() if name != hottest for d in g]
    rest_mean = math.fsum(rest) / len(rest)
    hot_mean = math.fsum(groups[hottest]) / len(groups[hottest])
    ratio = hot_mean / rest_mean if rest_mean > 0 else math.inf
    return {"groups": len(groups), "hottest": hottest, "ratio_to_rest": ratio,
            "p_value": float(test.pvalue),
            "holds": ratio >= HOTTER and float(test.pvalue) <= P_MAX}


def judge(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """sensitivity_stats.json's `hierarchy`: the rule, each grouping's test, the verdict."""
    tests = {by: grouping(rows, by) for by in ("layer", "component")}
    judged = [t for t in tests.values() if t is not None]
    return {"rule": RULE, "matrices": len(rows), **tests,
            "hierarchical": any(t["holds"] for t in judged) if judged else None}


def row(h: dict[str, Any]) -> dict[str, Any]:
    """Phase 2 hierarchy: clear layer- or component-wise patterns, against the null."""
    parts = [f"{by}s: hottest {t['hottest']} x{t['ratio_to_rest']:.3g} the rest, "
             f"p={t['p_value']:.3g}" for by in ("layer", "component")
             if (t := h.get(by)) is not None]
    note = "; ".join(parts) or "a single layer and component: nothing to compare"
    return criteria.check("hierarchy: a layer or component hotter than chance",
                          h["hierarchical"], "==", True,
                          f"{note} ({h['matrices']} matrices); {RULE}")
