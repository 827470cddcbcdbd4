"""What the perturbation study's numbers mean: summaries, separation, significance, criteria.

Everything here loops over the evaluators' declared measures (`esa_core.api.Measure`); no
measure is known by name. The first measure of the first evaluator is the primary one: the
Phase 3 criteria judge by it. Every measure gets its summary, spread and separation ratios.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats

from esa_core import criteria
from esa_core.api import Measure
from esa_core.layout import BOTTOM_K, MAGNITUDE_K, RANDOM_K, RANDOM_K_REPEATS, SUPER

SEPARATION = 3.0  # the guide: super-weight perturbations cause >= 3x the impact of random ones
P_MAX = 0.05  # the super effect must be rarer than this among random draws
CONTROL_SHORT = {RANDOM_K: "random", BOTTOM_K: "bottom", MAGNITUDE_K: "magnitude"}
HIERARCHY_SHARE = 0.10  # the busiest tenth of the matrices holding top-k weights ...
HIERARCHY_MIN = 0.5  # ... must hold at least half of the top-k's score mass
HIERARCHY_RULE = ("hierarchical = the busiest 10% of the matrices holding top-k weights (by "
                  "the top-k score mass they hold) hold >= 50% of it (an even spread: 10%)")
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator) of the values that are not
    None: ESA's every spread is over seeds, draws or seed pairs, a sample of the many it could
    have used. SD 0 for one value, NaN when a value is not finite; (None, None) for none."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = math.fsum(values) / len(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, (0.0 if len(values) < 2 else math.nan)
    return mean, statistics.stdev(values)


def summarise(per_seed: list[dict[str, Any]], measures: Sequence[Measure]) -> dict[str, Any]:
    """One condition: the means over seeds up front (every change, then every value), then
    per_seed and the mean and SD of every number the evaluators reported."""
    declared = [m.change_name for m in measures] + [m.name for m in measures]
    extra = [k for k, v in per_seed[0].items()
             if isinstance(v, float) and k not in declared]  # e.g. loss
    mean, std = {}, {}
    for key in declared + extra:
        mean[key], std[key] = mean_std([number(t[key]) for t in per_seed])
    primary = measures[0].name
    return {
        **{key: mean[key] for key in declared},
        "nonfinite_seeds": sum(bool(t.get("nonfinite_outputs"))
                               or not math.isfinite(number(t[primary])) for t in per_seed),
        "per_seed": per_seed, "mean": mean, "std": std,
    }


def number(value: float | None) -> float:
    """A reported value as a float; None (a non-finite value read back from JSON) is NaN."""
    return math.nan if value is None else float(value)


def damage(value: float | None) -> float:
    """A change for comparisons: a model whose outputs became non-finite is broken (+inf)."""
    return math.inf if value is None or math.isnan(value) else value


def ratio(a: float, b: float) -> float:
    """a / b of two damages; inf when only `a` is harmful, NaN when undefined."""
    a, b = damage(a), damage(b)
    if math.isinf(a) and math.isinf(b):
        return math.nan
    if b <= 0.0:
        return math.inf if a > 0.0 else math.nan
    return a / b


def _draws(results: dict[str, Any], name: str, key: str) -> list[float]:
    values = [damage(t[key]) for t in results[name]["per_seed"]]
    if name == RANDOM_K:
        values += [damage(t[key]) for t in results.get(RANDOM_K_REPEATS, [])]
    return values


def analyse(results: dict[str, Any], measures: Sequence[Measure]) -> dict[str, Any]:
    """control_analysis.json: per measure the changes, separation ratios and the controls'
    spread; the primary measure's also at the top level (the guide's keys); significance."""
    by_measure = {m.change_name: _measure_analysis(results, m.change_name) for m in measures}
    primary = measures[0].change_name
    analysis: dict[str, Any] = {
        "primary_measure": primary,
        primary: by_measure[primary]["changes"],
        "separation": by_measure[primary]["separation"],
        "spread": {name: {key: value for m in measures
                          for key, value in by_measure[m.change_name]["spread"][name].items()}
                   for name in by_measure[primary]["spread"]},
        "measures": by_measure,
    }
    if RANDOM_K in results:
        analysis["significance"] = significance(results, primary)
    if MAGNITUDE_K in results:
        analysis["magnitude_overlap_with_super"] = \
            results[MAGNITUDE_K]["per_seed"][0]["overlap_with_super"]
    return analysis


def _measure_analysis(results: dict[str, Any], key: str) -> dict[str, Any]:
    changes = {name: damage(results[name][key])
               for name in (SUPER, *CONTROL_SHORT) if name in results}
    separation = {f"super_vs_{short}": ratio(changes[SUPER], changes[name])
                  for name, short in CONTROL_SHORT.items() if name in changes}
    if RANDOM_K in changes and BOTTOM_K in changes:
        separation["random_vs_bottom"] = ratio(changes[RANDOM_K], changes[BOTTOM_K])
    spread = {}
    for name in CONTROL_SHORT:
        if name in results:
            values = _draws(results, name, key)
            mean, std = mean_std(values)
            spread[name] = {f"{key}_mean": mean, f"{key}_std": std, f"{key}_min": min(values),
                            f"{key}_max": max(values), "draws": len(values)}
    return {"changes": changes, "separation": separation, "spread": spread}


def significance(results: dict[str, Any], key: str) -> dict[str, Any]:
    """Is the super set's damage rarer than chance among random sets of the same size?

    p: an exact permutation test of the super value against the R random draws (seeds and
    --control-repeats): under the null that the super set is one more random draw, its rank
    among the R+1 values is uniform, so p = (1 + draws at least as damaging) / (R + 1) and p
    cannot be below 1/(R+1). (scipy.stats.permutation_test needs two observations per
    sample; with one super value its exact answer is this count.) A broken model (+inf) ranks
    above every finite draw.
    ci: bootstrap 95% intervals of the super set's mean over seeds, of the random draws' mean,
    and of their ratio (the separation), resampling seeds and draws independently.
    """
    super_values = [damage(t[key]) for t in results[SUPER]["per_seed"]]
    super_change = damage(results[SUPER][key])
    draws = _draws(results, RANDOM_K, key)
    at_least = sum(d >= super_change for d in draws)
    return {"random_draws": len(draws), "random_changes": draws, "measure": key,
            "random_mean": mean_std(draws)[0], "random_std": mean_std(draws)[1],
            "p_value": (1 + at_least) / (1 + len(draws)), "p_value_floor": 1 / (1 + len(draws)),
            "confidence": CONFIDENCE,
            "ci_super": bootstrap_ci([super_values], np.mean),
            "ci_random": bootstrap_ci([draws], np.mean),
            "ci_separation": _separation_ci(super_values, draws)}


def _separation_ci(super_values: list[float], draws: list[float]) -> list[float] | None:
    """Bootstrap interval of mean(super) / mean(random); one super value (one seed, or a
    deterministic rule) is held fixed and only the random draws are resampled."""
    if len(super_values) == 1:
        (fixed,) = super_values
        return bootstrap_ci([draws], lambda r, axis: fixed / np.mean(r, axis=axis))
    return bootstrap_ci([super_values, draws],
                        lambda s, r, axis: np.mean(s, axis=axis) / np.mean(r, axis=axis))


def bootstrap_ci(samples: list[list[float]], statistic) -> list[float] | None:
    """A percentile bootstrap interval of `statistic`; None where it is undefined (a non-finite
    value, a sample of one) and the point itself where every resample agrees."""
    if any(len(s) < 2 for s in samples) or not all(math.isfinite(v) for s in samples for v in s):
        return None
    data = [np.asarray(s, dtype=float) for s in samples]
    point = float(statistic(*data, axis=-1))
    if all(np.ptp(d) == 0 for d in data):
        return [point, point]
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.bootstrap(data, statistic, paired=False, vectorized=True,
                                 confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                                 method="percentile", random_state=np.random.default_rng(0))
    low, high = result.confidence_interval
    return [float(low), float(high)]


def hierarchy(top_rows: Sequence[dict[str, Any]], n_matrices: int) -> dict[str, Any]:
    """How concentrated the top-k is over the scored matrices, layers and components.

    Score mass rather than counts, so that per_layer mode (k in every matrix) still shows
    where the large scores sit; the busiest tenth is taken of the matrices that hold any
    top-k weight, so that a global top-k smaller than the number of matrices is not
    concentrated by construction.
    """
    by: dict[str, dict[Any, float]] = {"matrix": {}, "layer": {}, "component": {}}
    for r in top_rows:
        score = float(r["score"])
        matrix = (r["param"], r["expert"], r["component"])
        for key, where in (("matrix", matrix), ("layer", r["layer"]),
                           ("component", r["component"])):
            by[key][where] = by[key].get(where, 0.0) + score
    total = math.fsum(by["matrix"].values())
    masses = sorted(by["matrix"].values(), reverse=True)
    busiest = max(1, math.ceil(HIERARCHY_SHARE * len(masses)))
    share = math.fsum(masses[:busiest]) / total if total > 0 else None

    def shares(groups: dict[Any, float]) -> dict[str, float]:
        return {str(k): v / total for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}

    return {"rule": HIERARCHY_RULE, "n_matrices": n_matrices, "occupied_matrices": len(masses),
            "busiest_matrices": busiest,
            "top_share": share,
            "hierarchical": None if share is None else share >= HIERARCHY_MIN,
            "layer_shares": shares(by["layer"]) if total > 0 else {},
            "component_shares": shares(by["component"]) if total > 0 else {}}


def hierarchy_row(h: dict[str, Any]) -> dict[str, Any]:
    """Phase 2 hierarchy: clear layer- or component-wise patterns, as a measured share."""
    top = next(iter(h["component_shares"].items()), None)
    note = h["rule"] + (f"; largest component {top[0]} {top[1]:.0%}" if top else "")
    return criteria.check("hierarchy: top-k score share of the busiest tenth of matrices",
                          h["top_share"], ">=", HIERARCHY_MIN,
                          f"{h['busiest_matrices']} of the {h['occupied_matrices']} matrices "
                          f"holding top-k weights ({h['n_matrices']} scored); {note}")


def phase3_criteria(analysis: dict[str, Any] | None, measures: Sequence[Measure],
                    label: str = "") -> list[dict[str, Any]]:
    """The guide's Phase 3 success criteria on the primary measure (the first of `measures`),
    as `criteria` rows, then the ≥3× separation on every other declared measure.
    `analysis` is None when the stage ran without controls: every row is then a SKIP."""
    analysis = analysis or {}
    key = measures[0].change_name
    changes = analysis.get(key, {})
    sep = analysis.get("separation", {})
    sig = analysis.get("significance")
    needs = "run with --controls random_k,bottom_k"
    where = f" [{label}]" if label else ""
    ordering = f"separation{where}: {key}(super) > {key}(random) > {key}(bottom)"
    magnitude = f"magnitude{where}: {key}(super) / {key}(random)"
    significant = f"significance{where}: permutation p of {key}(super) among random draws"
    rows = []
    if RANDOM_K in changes and BOTTOM_K in changes:
        order = [changes[SUPER], changes[RANDOM_K], changes[BOTTOM_K]]
        rows.append(criteria.check(ordering, order[0] > order[1] > order[2], "==", True,
                                   " > ".join(_fmt(v) for v in order)))
    else:
        rows.append(criteria.skipped(ordering, "==", True, needs))
    if "super_vs_random" in sep:
        rows.append(criteria.check(magnitude, sep["super_vs_random"], ">=", SEPARATION))
        rows.append(significance_row(significant, sig))
    else:
        rows.append(criteria.skipped(magnitude, ">=", SEPARATION, needs))
        rows.append(criteria.skipped(significant, "<=", P_MAX, needs))
    by_measure = analysis.get("measures", {})
    return rows + [_magnitude_row(m.change_name,
                                  by_measure.get(m.change_name, {}).get("separation", {}),
                                  where, needs) for m in measures[1:]]


def _magnitude_row(key: str, sep: dict[str, Any], where: str, needs: str) -> dict[str, Any]:
    """The ≥3× separation on another declared measure (task accuracy, say): reported beside the
    primary measure's; a SKIP when neither set moved that measure at all."""
    criterion = f"magnitude{where}: {key}(super) / {key}(random)"
    if "super_vs_random" not in sep:
        return criteria.skipped(criterion, ">=", SEPARATION, needs)
    value = sep["super_vs_random"]
    if value is None or math.isnan(value):
        return criteria.skipped(criterion, ">=", SEPARATION,
                                f"no damage to {key} from the super set or the random sets")
    return criteria.check(criterion, value, ">=", SEPARATION)


def significance_row(criterion: str, sig: dict[str, Any]) -> dict[str, Any]:
    """PASS when p <= 0.05; a SKIP when too few random draws exist for p to reach 0.05."""
    draws = sig["random_draws"]
    needed = math.ceil(1 / P_MAX) - 1  # 19 draws: the smallest p is 1/20
    if draws < needed:
        return criteria.skipped(
            criterion, "<=", P_MAX,
            f"{draws} random draws: p cannot go below 1/{draws + 1}; add --control-repeats "
            f"{needed - draws} or more (>= {needed} draws in all)")
    ci = sig.get("ci_separation")
    note = f"{draws} draws" + (f"; {int(100 * CONFIDENCE)}% CI of the separation "
                                f"{_fmt(ci[0])}..{_fmt(ci[1])}" if ci else "")
    return criteria.check(criterion, sig["p_value"], "<=", P_MAX, note)


def robustness_row(separations: dict[str, dict[str, Any] | None],
                   measures: Sequence[Measure]) -> dict[str, Any]:
    """Phase 3 robustness: the separation holds for every perturbation type.

    `separations` maps each type to its analysis (None when it ran without controls). A type
    holds when super > random > bottom and super / random >= 3 on the primary measure.
    """
    criterion = "robustness: separation holds for every perturbation type"
    if len(separations) < 2:
        return criteria.skipped(criterion, "==", True,
                                "run with several --perturb types, e.g. sign_flip,zero,gauss_noise")
    held = {}
    for name, analysis in separations.items():
        rows = phase3_criteria(analysis, measures)[:2]
        if any(r["verdict"] == criteria.SKIP for r in rows):
            return criteria.skipped(criterion, "==", True,
                                    "run with --controls random_k,bottom_k")
        held[name] = all(r["verdict"] == criteria.PASS for r in rows)
    note = ", ".join(f"{name}: {'holds' if ok else 'fails'}" for name, ok in held.items())
    return criteria.check(criterion, all(held.values()), "==", True, note)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
