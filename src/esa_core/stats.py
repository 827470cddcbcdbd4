"""Summary statistics of the score distribution, per logical matrix and over the whole model.

Exact moments (count, mean, std, max, kurtosis) are streamed matrix by matrix; quantiles come
from a fixed-size deterministic sample and the tail index from the merged top scores, so no
tensor of all the model's scores is ever built (the original spent minutes on exact percentiles).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from esa_core.api import LogicalMatrix

QUANTILES = (0.5, 0.9, 0.99, 0.999, 0.9999)
SAMPLE_PER_MATRIX = 4096
TAIL_FRACTION = 0.001  # Hill's estimator uses the top 0.1 % of scores (at least 10, at most 10k)
HEAVY_TAIL_RULE = "heavy_tailed = excess kurtosis > 3 (Gaussian: 0) and Hill tail index < 4"


def hill_tail_index(top_descending: torch.Tensor) -> float | None:
    """Hill's estimator alpha from the largest scores, sorted descending (positive values)."""
    x = top_descending.double()
    x = x[x > 0]
    if len(x) < 3:
        return None
    logs = torch.log(x)
    gamma = float((logs[:-1] - logs[-1]).mean())
    return 1.0 / gamma if gamma > 0 else None


class _Moments:
    """Streaming sums for mean, std and kurtosis."""

    def __init__(self) -> None:
        self.n, self.s1, self.s2, self.s3, self.s4 = 0, 0.0, 0.0, 0.0, 0.0
        self.max = -math.inf

    def add(self, x: torch.Tensor) -> None:
        x = x.double()
        self.n += x.numel()
        self.s1 += float(x.sum())
        self.s2 += float((x * x).sum())
        self.s3 += float((x**3).sum())
        self.s4 += float((x**4).sum())
        self.max = max(self.max, float(x.max()))

    def summary(self) -> dict:
        n = self.n
        mean = self.s1 / n
        var = max(self.s2 / n - mean**2, 0.0)
        m4 = self.s4 / n - 4 * mean * self.s3 / n + 6 * mean**2 * self.s2 / n - 3 * mean**4
        kurtosis = m4 / var**2 - 3.0 if var > 0 else None
        return {"count": n, "mean": mean, "std": math.sqrt(var), "max": self.max,
                "excess_kurtosis": kurtosis}


def _sample(x: torch.Tensor, size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    if flat.numel() <= size:
        return flat.float().cpu()
    idx = torch.linspace(0, flat.numel() - 1, size, device=flat.device).long()
    return flat[idx].float().cpu()


def _tail(top: torch.Tensor, sample: torch.Tensor, moments: dict) -> dict:
    q = torch.quantile(sample, torch.tensor(QUANTILES, dtype=sample.dtype))
    median = float(q[0])
    alpha = hill_tail_index(top)
    kurt = moments["excess_kurtosis"]
    return {
        "quantiles": {f"q{p:g}": float(v) for p, v in zip(QUANTILES, q)},
        "top1_median_ratio": float(top[0]) / median if median > 0 else None,
        "hill_tail_index": alpha,
        "hill_order_statistics": len(top),
        "heavy_tailed": bool(kurt is not None and kurt > 3 and alpha is not None and alpha < 4),
    }


def sensitivity_stats(
    scores: Mapping[str, torch.Tensor], matrices: Iterable[LogicalMatrix]
) -> dict:
    """`sensitivity_stats.json`: global and per-matrix distribution summaries."""
    matrices = list(matrices)
    total = sum(m.view(scores[m.param]).numel() for m in matrices)
    tail_m = int(min(10_000, max(10, total * TAIL_FRACTION)))
    overall, per_layer, samples, tops = _Moments(), {}, [], []
    for m in matrices:
        view = m.view(scores[m.param])
        moments = _Moments()
        moments.add(view)
        overall.add(view)
        flat = view.reshape(-1)
        top = torch.topk(flat, min(tail_m, flat.numel())).values.float().cpu()
        sample = _sample(view, SAMPLE_PER_MATRIX)
        local_m = max(10, min(len(top), int(flat.numel() * TAIL_FRACTION)))
        summary = moments.summary()
        per_layer[m.key] = {"param": m.param, "layer": m.layer, "component": m.component,
                            "expert": m.expert, **summary, **_tail(top[:local_m], sample, summary)}
        # weight the global sample by matrix size so big matrices are not under-represented
        samples.append(_sample(view, max(16, SAMPLE_PER_MATRIX * flat.numel() * len(matrices)
                                         // max(total, 1))))
        tops.append(top)
    global_summary = overall.summary()
    global_top = torch.topk(torch.cat(tops), tail_m).values
    return {
        "global": {**global_summary, **_tail(global_top, torch.cat(samples), global_summary)},
        "heavy_tail_rule": HEAVY_TAIL_RULE,
        "per_layer": per_layer,
    }
