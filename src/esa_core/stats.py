"""Summary statistics of the score distribution, per logical matrix and over the whole model.

Exact moments (count, mean, std, max, kurtosis) are streamed matrix by matrix; quantiles come
from a fixed-size deterministic sample and the tail index from the merged top scores, so no
tensor of all the model's scores is ever built (the original spent minutes on exact percentiles).
The same sample and top scores give a compact CCDF (global and per component) and a streamed
histogram of |w|, so figures are drawn from this file alone, never from the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from esa_core.api import LogicalMatrix
from esa_core.indices import evenly_spaced
from esa_core.selection import matrix_size, top_k

QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999)
SAMPLE_PER_MATRIX = 4096
GLOBAL_SAMPLE = 1 << 22  # the global sample's size at most (reached above 1024 matrices)
HISTOGRAM_CHUNK = 1 << 24  # |w| histogram: weights binned at a time (bounds its scratch memory)
TAIL_FRACTION = 0.001  # Hill uses the top 0.1 % of scores as order statistics (10 to 10k)
HEAVY_TAIL_RULE = "heavy_tailed = excess kurtosis > 3 (Gaussian: 0) and Hill tail index < 4"
CCDF_POINTS = 64
CCDF_NOTE = ("fraction_at_least[i] of the scores are >= score[i]; exact from the top scores "
             "where fraction_at_least * count <= hill_order_statistics, else from the sample")
WEIGHT_LOG10_RANGE, WEIGHT_BINS = (-8.0, 2.0), 100  # |w| histogram: 0.1-decade bins, 1e-8..1e2


def hill_tail_index(top_descending: torch.Tensor) -> tuple[float | None, int]:
    """Hill's estimator of the tail index alpha, and the k order statistics it used.

    With the m largest positive values x(1) >= ... >= x(m): k = m - 1 and
    1/alpha = mean over i <= k of log x(i) - log x(k+1), x(k+1) being the threshold.
    """
    x = top_descending.double()
    x = x[x > 0]
    if len(x) < 3:
        return None, 0
    logs = torch.log(x)
    gamma = float((logs[:-1] - logs[-1]).mean())
    return (1.0 / gamma if gamma > 0 else None), len(x) - 1


class _Moments:
    """Count, mean, central moment sums M2..M4 and max, merged matrix by matrix (Pebay 2008).

    Each matrix is centred on its own mean before its powers are taken, so float32 products
    lose nothing that matters and the sums (in float64) suffer no cancellation; no float64
    copy of a matrix is made (the raw power sums this replaces cost twice the time and memory).
    """

    def __init__(self) -> None:
        self.n, self.mean, self.m2, self.m3, self.m4 = 0, 0.0, 0.0, 0.0, 0.0
        self.max = -math.inf

    def add(self, x: torch.Tensor) -> None:
        part = _Moments()
        part.n = x.numel()
        part.mean = float(x.sum(dtype=torch.float64)) / part.n
        d = x.float() - part.mean
        d2 = d * d
        part.m2 = float(d2.sum(dtype=torch.float64))
        part.m3 = float((d2 * d).sum(dtype=torch.float64))
        part.m4 = float(d2.square_().sum(dtype=torch.float64))
        part.max = float(x.max())
        self.merge(part)

    def merge(self, other: _Moments) -> None:
        """Fold in another matrix's moments (the global moments reuse the per-matrix pass)."""
        a, b = self, other
        if b.n == 0:
            return
        n = a.n + b.n
        delta = b.mean - a.mean
        m2 = a.m2 + b.m2 + delta**2 * a.n * b.n / n
        m3 = (a.m3 + b.m3 + delta**3 * a.n * b.n * (a.n - b.n) / n**2
              + 3 * delta * (a.n * b.m2 - b.n * a.m2) / n)
        m4 = (a.m4 + b.m4 + delta**4 * a.n * b.n * (a.n**2 - a.n * b.n + b.n**2) / n**3
              + 6 * delta**2 * (a.n**2 * b.m2 + b.n**2 * a.m2) / n**2
              + 4 * delta * (a.n * b.m3 - b.n * a.m3) / n)
        self.mean += delta * b.n / n
        self.n, self.m2, self.m3, self.m4 = n, m2, m3, m4
        self.max = max(a.max, b.max)

    def summary(self) -> dict:
        var = self.m2 / self.n
        kurtosis = (self.m4 / self.n) / var**2 - 3.0 if var > 0 else None
        return {"count": self.n, "mean": self.mean, "std": math.sqrt(var), "max": self.max,
                "excess_kurtosis": kurtosis}


def _sample(x: torch.Tensor, size: int) -> torch.Tensor:
    """`size` values at evenly spaced positions (int64: exact past 2^24 elements)."""
    flat = x.reshape(-1)
    if flat.numel() <= size:
        return flat.float().cpu()
    return flat[evenly_spaced(flat.numel(), size).to(flat.device)].float().cpu()


def quantiles(sample: torch.Tensor, levels: list[float]) -> list[float]:
    """Linearly interpolated quantiles in float64 (numpy: torch.quantile refuses more than
    2^24 values, and float32 levels cannot tell 1 - 1e-8 from 1)."""
    return np.quantile(sample.double().numpy(), levels).tolist()


def ccdf(top: torch.Tensor, sample: torch.Tensor, count: int) -> dict:
    """P(score >= x) at log-spaced ranks: the tail exact from `top` (descending), the bulk from
    the deterministic sample; CCDF_POINTS pairs, never all scores."""
    ranks = torch.logspace(0, math.log10(count), CCDF_POINTS, dtype=torch.float64)
    ranks = torch.unique(ranks.round().long().clamp(1, count)).tolist()
    exact = [r for r in ranks if r <= len(top)]
    sampled = [r for r in ranks if r > len(top)]
    values = [float(top[r - 1]) for r in exact]
    if sampled:
        values += quantiles(sample, [min(max(1.0 - r / count, 0.0), 1.0) for r in sampled])
    return {"score": values, "fraction_at_least": [r / count for r in exact + sampled]}


def weight_histogram(weights: Iterable[torch.Tensor]) -> dict:
    """Counts of |w| in log-spaced bins [e_i, e_i+1), streamed matrix by matrix, chunk by chunk.

    Each |w| is placed by binary search among the edges (no log10 of every weight), and counted
    in int64 (torch.histc counts in float32, which stops adding 1 at 2^24 in a bin).
    """
    low, high = WEIGHT_LOG10_RANGE
    edges = torch.logspace(low, high, WEIGHT_BINS + 1, dtype=torch.float64)
    # slot 0: below e_0; slots 1..WEIGHT_BINS: the bins; the last slot: at or above the top edge
    counts = torch.zeros(WEIGHT_BINS + 2, dtype=torch.int64)
    total = 0
    for w in weights:
        cuts = edges.to(w.device, torch.float32)
        for chunk in w.detach().reshape(-1).split(HISTOGRAM_CHUNK):
            slots = torch.bucketize(chunk.float().abs(), cuts, right=True)
            counts += torch.bincount(slots, minlength=WEIGHT_BINS + 2).cpu()
            total += chunk.numel()
    return {"bin_edges": edges.tolist(), "counts": counts[1:-1].tolist(),
            "below": int(counts[0]), "above": int(counts[-1]), "count": total}


def _tail(top: torch.Tensor, sample: torch.Tensor, moments: dict, topk: int) -> dict:
    q = quantiles(sample, list(QUANTILES))
    median = q[0]
    alpha, used = hill_tail_index(top[: tail_order_statistics(moments["count"]) + 1])
    kurt = moments["excess_kurtosis"]
    return {
        "quantiles": {f"q{p:g}": v for p, v in zip(QUANTILES, q)},
        "top1_median_ratio": float(top[0]) / median if median > 0 else None,
        "topk_mean_median_ratio": float(top[:topk].mean()) / median if median > 0 else None,
        "topk_for_ratio": min(topk, len(top)),
        "hill_tail_index": alpha,
        "hill_order_statistics": used,
        "heavy_tailed": bool(kurt is not None and kurt > 3 and alpha is not None and alpha < 4),
    }


def tail_order_statistics(count: int) -> int:
    """How many of the largest scores Hill's estimator uses: the top 0.1 %, 10 to 10k."""
    return int(min(10_000, max(10, count * TAIL_FRACTION)))


def sensitivity_stats(
    scores: Mapping[str, torch.Tensor], matrices: Iterable[LogicalMatrix],
    weights: Mapping[str, torch.Tensor] | None = None, topk: int = 100,
) -> dict:
    """`sensitivity_stats.json`: global, per-component and per-matrix distribution summaries;
    with `weights`, also a histogram of the scored weights' |w|. `topk` is the run's k: the
    top-k-mean/median ratio says how far the selected weights stand above a typical one."""
    matrices = list(matrices)
    total = sum(matrix_size(m, scores[m.param].shape) for m in matrices)
    sample_budget = min(SAMPLE_PER_MATRIX * len(matrices), GLOBAL_SAMPLE)
    tail_m = max(tail_order_statistics(total) + 1, topk)
    overall, per_layer, samples, tops = _Moments(), {}, [], []
    by_component: dict[str, list[int]] = {}
    for m in matrices:
        view = m.view(scores[m.param])
        moments = _Moments()
        moments.add(view)
        overall.merge(moments)
        flat = view.reshape(-1)
        top = top_k(flat, min(tail_m, flat.numel()))[0].float().cpu()
        summary = moments.summary()
        per_layer[m.key] = {"param": m.param, "layer": m.layer, "component": m.component,
                            "expert": m.expert, **summary,
                            **_tail(top, _sample(view, SAMPLE_PER_MATRIX), summary, topk)}
        # weight the global sample by matrix size so big matrices are not under-represented
        samples.append(_sample(view, max(16, sample_budget * flat.numel() // max(total, 1))))
        tops.append(top)
        by_component.setdefault(m.component, []).append(len(tops) - 1)
    global_summary = overall.summary()
    global_top = torch.topk(torch.cat(tops), tail_m).values
    global_sample = torch.cat(samples)
    result = {
        "global": {**global_summary, **_tail(global_top, global_sample, global_summary, topk),
                   "ccdf": ccdf(global_top, global_sample, total)},
        "heavy_tail_rule": HEAVY_TAIL_RULE,
        "ccdf_note": CCDF_NOTE,
        "per_component": {c: _component(idx, matrices, scores, tops, samples, tail_m)
                          for c, idx in by_component.items()},
        "per_layer": per_layer,
    }
    if weights is not None:
        result["weight_abs_histogram"] = weight_histogram(m.view(weights[m.param])
                                                          for m in matrices)
    return result


def _component(idx: list[int], matrices: list[LogicalMatrix], scores: Mapping[str, torch.Tensor],
               tops: list[torch.Tensor], samples: list[torch.Tensor], tail_m: int) -> dict:
    """One component's tail (all its matrices together): Hill index and CCDF."""
    count = sum(matrix_size(matrices[i], scores[matrices[i].param].shape) for i in idx)
    merged = torch.cat([tops[i] for i in idx])
    top = torch.topk(merged, min(tail_m, len(merged))).values
    alpha, used = hill_tail_index(top[: tail_order_statistics(count) + 1])
    return {"count": count, "n_matrices": len(idx), "max": float(top[0]),
            "hill_tail_index": alpha, "hill_order_statistics": used,
            "ccdf": ccdf(top, torch.cat([samples[i] for i in idx]), count)}
