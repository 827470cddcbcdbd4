"""Intervals over the evaluation items: how far a change could move on other held-out data.

The evaluation items (held-out blocks, task questions) are the same for the baseline and every
perturbed state, so an interval resamples them once for all: a paired bootstrap over item
indices (`scipy.stats.bootstrap`), each resample recomputing the baseline's and every perturbed
state's value on the same items. Seeds do not give this uncertainty: a deterministic rule
scores the same number on every seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

from esa_core.api import PER_ITEM, Measure

CONFIDENCE = 0.95
RESAMPLES = 2000
_CELLS = 20_000_000  # resampled item values held at once (160 MB of float64)


def items(result: Mapping[str, Any], measure: Measure) -> tuple[np.ndarray, np.ndarray] | None:
    """A result's per-item (sums, counts) of `measure`, or None when its evaluator gave none."""
    found = (result.get(PER_ITEM) or {}).get(measure.name)
    if not found:
        return None
    return np.asarray(found["sum"], dtype=float), np.asarray(found["count"], dtype=float)


def paired_interval(measure: Measure, baseline: Mapping[str, Any],
                    results: Sequence[Mapping[str, Any]],
                    of: Callable[[Any, Any], Any] | None = None) -> list[float] | None:
    """The 95% paired bootstrap interval over evaluation items of the mean over `results` of
    `of(value, baseline value)` (default: the measure's damage, i.e. its change).

    None where no interval exists: an evaluator without per-item values, fewer than two items,
    or a non-finite item (a broken model is a result, not an uncertainty).
    """
    of = of or measure.damage
    found = [items(r, measure) for r in (baseline, *results)]
    if not results or any(f is None for f in found):
        return None
    n = len(found[0][0])
    if n < 2 or any(len(s) != n or len(c) != n for s, c in found):
        return None
    sums, counts = np.stack([s for s, _ in found]), np.stack([c for _, c in found])
    if not (np.isfinite(sums).all() and np.isfinite(counts).all()):
        return None

    def statistic(index: np.ndarray, axis: int = -1) -> np.ndarray:
        picked = index.astype(np.intp)
        values = measure.value_from_items(sums[:, picked], counts[:, picked])
        return np.mean(of(values[1:], values[0]), axis=0)

    result = stats.bootstrap((np.arange(n),), statistic, vectorized=True,
                             n_resamples=RESAMPLES, batch=max(1, _CELLS // sums.size),
                             confidence_level=CONFIDENCE, method="percentile",
                             rng=np.random.default_rng(0))
    low, high = (float(v) for v in result.confidence_interval)
    return [low, high] if math.isfinite(low) and math.isfinite(high) else None


def note(measure: Measure, baseline: Mapping[str, Any]) -> str:
    """What a measure's intervals are, or why it has none."""
    found = items(baseline, measure)
    if found is None:
        return (f"no interval: the evaluator returned no per-item values for {measure.name}")
    return (f"{int(100 * CONFIDENCE)}% paired bootstrap over the {len(found[0])} evaluation "
            f"items (the same resampled items for baseline and perturbed)")
