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

from esa_core import criteria, intervals
from esa_core.api import Measure
from esa_core.layout import BOTTOM_K, MAGNITUDE_K, RANDOM_K, RANDOM_K_REPEATS, SUPER

SEPARATION = 3.0  # the guide: super-weight perturbations cause >= 3x the impact of random ones
P_MAX = 0.05  # the super effect must be rarer than this among random draws
CONTROL_SHORT = {RANDOM_K: "random", BOTTOM_K: "bottom", MAGNITUDE_K: "magnitude"}
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


def separation_ratio(a: float, b: float, b_interval: list[float] | None,
                     control: str) -> tuple[float | None, str | None]:
    """a / b of two damages, or (None, why) when the ratio does not exist: a control that did
    not move the measure (mean damage <= 0, or an interval over the evaluation items holding
    0) cannot be multiplied, and a broken model (+inf) is not a number of times anything."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return None, "a set made the model's outputs non-finite"
    if b <= 0.0:
        return None, f"{control} did not move it (mean damage {b:.4g} <= 0)"
    if b_interval is not None and b_interval[0] <= 0.0:
        return None, (f"{control} did not move it beyond the evaluation items' noise "
                      f"(interval {b_interval[0]:.4g}..{b_interval[1]:.4g} holds 0)")
    return a / b, None


def _trials(results: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A condition's trials; random_k's are its seeds and --control-repeats: one set of
    random draws feeds the ratio, its interval, the spread and the p-value."""
    trials = list(results[name]["per_seed"])
    if name == RANDOM_K:
        trials += results.get(RANDOM_K_REPEATS, [])
    return trials


def _draws(results: dict[str, Any], name: str, key: str) -> list[float]:
    return [damage(t[key]) for t in _trials(results, name)]


def analyse(results: dict[str, Any], measures: Sequence[Measure]) -> dict[str, Any]:
    """control_analysis.json: per measure the changes with their intervals over evaluation
    items, separation ratios (or why none) and the controls' spread; the primary measure's
    also at the top level (the guide's keys); significance."""
    by_measure = {m.change_name: _measure_analysis(results, m) for m in measures}
    primary = measures[0].change_name
    analysis: dict[str, Any] = {
        "primary_measure": primary,
        primary: by_measure[primary]["changes"],
        "intervals": by_measure[primary]["intervals"],
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


def _measure_analysis(results: dict[str, Any], measure: Measure) -> dict[str, Any]:
    key = measure.change_name
    baseline = results.get("baseline", {})
    names = [name for name in (SUPER, *CONTROL_SHORT) if name in results]
    changes = {name: damage(mean_std([number(t[key]) for t in _trials(results, name)])[0])
               for name in names}
    cis = {name: intervals.paired_interval(measure, baseline, _trials(results, name))
           for name in names}
    separation, reasons = {}, {}
    pairs = [(f"super_vs_{short}", SUPER, name) for name, short in CONTROL_SHORT.items()]
    for label, a, b in [*pairs, ("random_vs_bottom", RANDOM_K, BOTTOM_K)]:
        if a in changes and b in changes:
            separation[label], why = separation_ratio(changes[a], changes[b], cis[b], b)
            if why:
                reasons[label] = why
    spread = {}
    for name in CONTROL_SHORT:
        if name in results:
            values = _draws(results, name, key)
            mean, std = mean_std(values)
            spread[name] = {f"{key}_mean": mean, f"{key}_std": std, f"{key}_min": min(values),
                            f"{key}_max": max(values), "draws": len(values)}
    return {"changes": changes, "intervals": cis,
            "interval_note": intervals.note(measure, baseline),
            "separation": separation, "separation_reasons": reasons, "spread": spread}


PERMUTATIONS = 9999
_BROKEN = 1e300  # a broken model (+inf) in a difference of means: above every finite draw


def significance(results: dict[str, Any], key: str) -> dict[str, Any]:
    """Is the super set's damage rarer than chance among random sets of the same size?

    Like with like. When every super trial gave the same value (a deterministic rule on the
    fixed evaluation items, or one seed), that value is one draw: under the null that the super
    set is one more random set, its rank among the R+1 values is uniform, so p = (1 + draws
    at least as damaging) / (R + 1), never below 1/(R+1). When the super trials differ (a
    stochastic rule over several seeds), the super trials and the random draws are two samples:
    a one-sided permutation test of the difference of their means (scipy.stats.permutation_test).
    ci_random and ci_separation: bootstrap 95% intervals over the draws (and the super trials
    when they differ) of the random mean and of mean(super) / mean(random); no separation
    interval when the random sets did not move the measure.
    """
    super_values = [damage(t[key]) for t in results[SUPER]["per_seed"]]
    draws = _draws(results, RANDOM_K, key)
    random_mean = mean_std(draws)[0]
    if len(set(super_values)) == 1:
        test = "rank of the super value among single random draws (exact)"
        p = (1 + sum(d >= super_values[0] for d in draws)) / (1 + len(draws))
        floor = 1 / (1 + len(draws))
    else:
        test = "permutation test, super trials vs random draws, difference of means (one-sided)"
        capped = [np.minimum(np.asarray(v, dtype=float), _BROKEN) for v in (super_values, draws)]
        p = float(stats.permutation_test(
            capped, _mean_difference, permutation_type="independent", alternative="greater",
            vectorized=True, n_resamples=PERMUTATIONS, rng=np.random.default_rng(0)).pvalue)
        floor = 1 / min(math.comb(len(super_values) + len(draws), len(super_values)),
                        PERMUTATIONS + 1)
    moved = math.isfinite(random_mean) and random_mean > 0
    return {"test": test, "super_trials": len(super_values), "super_changes": super_values,
            "random_draws": len(draws), "random_changes": draws, "measure": key,
            "random_mean": random_mean, "random_std": mean_std(draws)[1],
            "p_value": p, "p_value_floor": floor, "confidence": CONFIDENCE,
            "ci_random": bootstrap_ci([draws], np.mean),
            "ci_separation": _separation_ci(super_values, draws) if moved else None}


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a, axis=axis) - np.mean(b, axis=axis)


def _separation_ci(super_values: list[float], draws: list[float]) -> list[float] | None:
    """Bootstrap interval of mean(super) / mean(random); a super value that every trial
    repeats (a deterministic rule) is held fixed and only the random draws are resampled."""
    if len(set(super_values)) == 1:
        fixed = super_values[0]
        return bootstrap_ci([draws], lambda r, axis: fixed / np.mean(r, axis=axis))
    return bootstrap_ci([super_values, draws],
                        lambda s, r, axis: np.mean(s, axis=axis) / np.mean(r, axis=axis))


def bootstrap_ci(samples: list[list[float]], statistic) -> list[float] | None:
    """A percentile bootstrap interval of `statistic`; None where it is undefined (a non-finite
    value, a sample of one, a resample whose statistic is not finite) and the point itself
    where every resample agrees."""
    if any(len(s) < 2 for s in samples) or not all(math.isfinite(v) for s in samples for v in s):
        return None
    data = [np.asarray(s, dtype=float) for s in samples]
    point = float(statistic(*data, axis=-1))
    if all(np.ptp(d) == 0 for d in data):
        return [point, point]
    with np.errstate(divide="ignore", invalid="ignore"):
        result = stats.bootstrap(data, statistic, paired=False, vectorized=True,
                                 confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                                 method="percentile", rng=np.random.default_rng(0))
    low, high = (float(v) for v in result.confidence_interval)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def phase3_criteria(analysis: dict[str, Any] | None, measures: Sequence[Measure],
                    label: str = "") -> list[dict[str, Any]]:
    """The guide's Phase 3 success criteria on the primary measure (the first of `measures`),
    as `criteria` rows, then the ≥3× separation on every other declared measure.
    `analysis` is None when the stage ran without controls: every row is then a SKIP."""
    analysis = analysis or {}
    key = measures[0].change_name
    changes = analysis.get(key, {})
    cis = analysis.get("intervals", {})
    sig = analysis.get("significance")
    needs = "run with --controls random_k,bottom_k"
    where = f" [{label}]" if label else ""
    ordering = f"separation{where}: {key}(super) > {key}(random) > {key}(bottom)"
    significant = f"significance{where}: p of {key}(super) against random draws"
    rows = []
    if RANDOM_K in changes and BOTTOM_K in changes:
        names = (SUPER, RANDOM_K, BOTTOM_K)
        order = [changes[name] for name in names]
        rows.append(criteria.check(ordering, order[0] > order[1] > order[2], "==", True,
                                   " > ".join(with_interval(changes[n], cis.get(n))
                                              for n in names)))
    else:
        rows.append(criteria.skipped(ordering, "==", True, needs))
    by_measure = analysis.get("measures", {})
    magnitude = [_magnitude_row(m.change_name, by_measure.get(m.change_name, {}), where, needs)
                 for m in measures]
    rows.append(magnitude[0])
    rows.append(significance_row(significant, sig) if sig
                else criteria.skipped(significant, "<=", P_MAX, needs))
    return rows + magnitude[1:]


def _magnitude_row(key: str, measured: dict[str, Any], where: str, needs: str) -> dict[str, Any]:
    """The ≥3× separation on one measure. Where the random sets did not move it there is no
    ratio, and the row falls back to the absolute test, saying so: PASS only when the super
    set's interval over the evaluation items lies above the random sets' interval."""
    criterion = f"magnitude{where}: {key}(super) / {key}(random)"
    sep = measured.get("separation", {})
    if "super_vs_random" not in sep:
        return criteria.skipped(criterion, ">=", SEPARATION, needs)
    value = sep["super_vs_random"]
    if value is not None:
        return criteria.check(criterion, value, ">=", SEPARATION)
    why = f"no ratio: {measured['separation_reasons']['super_vs_random']}"
    cis = measured.get("intervals", {})
    high, low = cis.get(SUPER), cis.get(RANDOM_K)
    if high is None or low is None:
        return criteria.skipped(criterion, ">=", SEPARATION,
                                f"{why}; no intervals for the absolute test "
                                f"({measured.get('interval_note', 'no per-item values')})")
    above = high[0] > low[1]
    return criteria.check(
        f"{criterion}, absolute test", above, "==", True,
        f"{why}; fell back to the absolute test: super's interval {_span(high)} "
        f"{'lies' if above else 'does not lie'} above random's {_span(low)}")


def with_interval(value: float, interval: list[float] | None) -> str:
    """A change and its interval over the evaluation items, e.g. `0.31 [0.27, 0.35]`."""
    return _fmt(value) + (f" {_span(interval)}" if interval else " [no interval]")


def _span(interval: list[float]) -> str:
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"


def significance_row(criterion: str, sig: dict[str, Any]) -> dict[str, Any]:
    """PASS when p <= 0.05; a SKIP when too few random draws exist for p to reach 0.05."""
    draws = sig["random_draws"]
    if sig["p_value_floor"] > P_MAX:
        if sig["test"].startswith("rank"):
            needed = math.ceil(1 / P_MAX) - 1  # 19 draws: the smallest p is 1/20
            more = f"add --control-repeats {needed - draws} or more (>= {needed} draws in all)"
        else:
            more = "add --control-repeats (or --seeds)"
        return criteria.skipped(
            criterion, "<=", P_MAX,
            f"{draws} random draws: p cannot go below {sig['p_value_floor']:.3g}; {more}")
    ci = sig.get("ci_separation")
    note = f"{sig['test']}; {draws} draws" + (
        f"; {int(100 * CONFIDENCE)}% CI of the separation over the draws "
        f"{_fmt(ci[0])}..{_fmt(ci[1])}" if ci else "")
    return criteria.check(criterion, sig["p_value"], "<=", P_MAX, note)


def robustness_row(separations: dict[str, dict[str, Any] | None],
                   measures: Sequence[Measure]) -> dict[str, Any]:
    """Phase 3 robustness: the separation holds for every perturbation type.

    `separations` maps each type to its analysis (None when it ran without controls). A type
    holds when super > random > bottom and super / random >= 3 on the primary measure, or,
    where the random sets did not move it, the absolute test of the magnitude row.
    """
    criterion = "robustness: separation holds for every perturbation type"
    if len(separations) < 2:
        return criteria.skipped(criterion, "==", True,
                                "run with several --perturb types, e.g. sign_flip,zero,gauss_noise")
    held = {}
    for name, analysis in separations.items():
        rows = phase3_criteria(analysis, measures)[:2]
        skip = next((r for r in rows if r["verdict"] == criteria.SKIP), None)
        if skip:
            return criteria.skipped(criterion, "==", True, f"{name}: {skip['note']}")
        held[name] = all(r["verdict"] == criteria.PASS for r in rows)
    note = ", ".join(f"{name}: {'holds' if ok else 'fails'}" for name, ok in held.items())
    return criteria.check(criterion, all(held.values()), "==", True, note)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)
