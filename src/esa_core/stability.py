"""Is the top-k set a property of the model, or of the calibration blocks a seed drew?

Each seed's scores live only while that seed is scored. `capture` keeps from them what
stability needs: every unit's top `4k` weights (a unit is one matrix in per_layer mode, the
whole model in global mode) as int64 keys (parameter offset + flat index) with their scores,
O(k) per matrix and never a copy of all scores (the original kept every seed's scores).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from esa_core.analysis import mean_std
from esa_core.api import LogicalMatrix
from esa_core.layout import STABILITY_SUMMARY
from esa_core.results import write_json
from esa_core.selection import Picks, select

log = logging.getLogger(__name__)

K_FACTORS = (0.25, 0.5, 1, 2, 4)  # overlap is reported at k/4, k/2, k, 2k and 4k
GLOBAL_UNIT = "global"
JACCARD_NOTE = "|A ∩ B| / |A ∪ B| of two top-k sets; 1.0 when both are empty"
PAIR_ORDER = "every pair (a, b) of seeds with a listed before b in --seeds"
ONE_SEED_NOTE = ("stability check skipped: it compares the top-k sets of two or more seeds, "
                 "and this run has one (pass e.g. --seeds 1337,123,999).")
DATA_FREE_NOTE = ("the metric reads no calibration data, so every seed gives the same scores: "
                  "the Jaccard of 1.0 holds by construction and says nothing about stability "
                  "across data; the stability criteria are skipped.")
RANK_NOTE = ("Spearman correlation of two seeds' scores over the union of all seeds' top-k sets "
             "(per matrix in per_layer mode, then averaged). Each seed recorded its own top-4k "
             "scores; a weight below a seed's top 4k ranks below all of them, tied with the "
             "other such weights. `known_fraction` is the share of scores that were recorded.")


@dataclass
class SeedTop:
    """One seed's highest-scoring weights per unit: keys and scores, highest score first."""

    units: dict[str, tuple[np.ndarray, np.ndarray]]

    def top(self, k: int) -> dict[str, np.ndarray]:
        """Each unit's top-k keys (all of a unit's captured keys where it has fewer)."""
        return {unit: keys[:k] for unit, (keys, _) in self.units.items()}

    def top_set(self, k: int) -> np.ndarray:
        """The seed's whole top-k set: the union of its units' top-k keys."""
        return np.concatenate(list(self.top(k).values()))


def _keys_scores(picks: Sequence[Picks], offsets: Mapping[str, int],
                 shapes: Mapping[str, torch.Size]) -> tuple[np.ndarray, np.ndarray]:
    keys = [p.keys(offsets, shapes[p.matrix.param]) for p in picks]
    scores = [p.scores.double().cpu() for p in picks]
    keys_np = torch.cat(keys).numpy().astype(np.int64)
    scores_np = torch.cat(scores).numpy()
    order = np.argsort(-scores_np, kind="stable")
    return keys_np[order], scores_np[order]


def capture(scores: Mapping[str, torch.Tensor], matrices: Sequence[LogicalMatrix],
            offsets: Mapping[str, int], k: int, mode: str) -> SeedTop:
    """What stability needs from one seed's scores, taken while they are alive."""
    depth = int(k * max(K_FACTORS))
    shapes = {name: scores[name].shape for name in offsets}
    if mode == "per_layer":
        units = {}
        for m in matrices:
            size = m.view(scores[m.param]).numel()
            picks = select(scores, [m], min(depth, size), mode).picks
            units[m.key] = _keys_scores(picks, offsets, shapes)
        return SeedTop(units)
    total = sum(m.view(scores[m.param]).numel() for m in matrices)
    picks = select(scores, matrices, min(depth, total), mode).picks
    return SeedTop({GLOBAL_UNIT: _keys_scores(picks, offsets, shapes)})


def jaccard(a: Iterable[Hashable], b: Iterable[Hashable]) -> float:
    """|a ∩ b| / |a ∪ b|; two empty sets are identical (1.0)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rho (scipy, average ranks for ties); None when either side has no spread."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    return float(stats.spearmanr(a, b).statistic)


def _scores_at(unit: tuple[np.ndarray, np.ndarray], keys: np.ndarray) -> np.ndarray:
    """A seed's recorded scores at `keys`; -inf (ranked last, tied) where it recorded none."""
    own_keys, own_scores = unit
    order = np.argsort(own_keys)
    pos = np.minimum(np.searchsorted(own_keys[order], keys), len(order) - 1)
    found = own_keys[order][pos] == keys
    return np.where(found, own_scores[order][pos], -np.inf)


def _overlap(tops: Mapping[int, SeedTop], k: int, pairs) -> dict[str, Any]:
    sets = {seed: top.top_set(k) for seed, top in tops.items()}
    values = [jaccard(sets[a], sets[b]) for a, b in pairs]
    mean, std = mean_std(values)
    common = set.intersection(*(set(keys) for keys in sets.values()))
    union = set().union(*(set(keys) for keys in sets.values()))
    return {"k": k, "jaccard_mean": mean, "jaccard_std": std, "jaccard_all": values,
            "topk_overlap_size": len(common), "topk_union_size": len(union)}


def _unit_detail(tops: Mapping[int, SeedTop], unit: str, k: int, pairs) -> dict[str, Any]:
    """Jaccard and rank correlation of one unit's top-k sets, and how many scores were known."""
    tops_k = {seed: top.units[unit][0][:k] for seed, top in tops.items()}
    union = np.unique(np.concatenate(list(tops_k.values())))
    at = {seed: _scores_at(top.units[unit], union) for seed, top in tops.items()}
    jac = [jaccard(tops_k[a], tops_k[b]) for a, b in pairs]
    rho = [rank_correlation(at[a], at[b]) for a, b in pairs]
    known = sum(int(np.isfinite(v).sum()) for v in at.values())
    return {"jaccard_mean": mean_std(jac)[0], "jaccard_all": jac, "spearman_all": rho,
            "n_union": int(union.size), "n_known": known, "n_slots": union.size * len(at)}


def summarize(tops: Mapping[int, SeedTop], k: int, mode: str) -> dict[str, Any]:
    """stability_summary.json: the guide's keys first, then the detail behind them."""
    seeds = list(tops)
    pairs = list(combinations(seeds, 2))
    at_k = _overlap(tops, k, pairs)
    units = list(next(iter(tops.values())).units)
    detail = {unit: _unit_detail(tops, unit, k, pairs) for unit in units}
    # a pair's rank correlation: the mean over units of that pair's per-unit value
    spearman_all = [mean_std([d["spearman_all"][i] for d in detail.values()])[0]
                    for i in range(len(pairs))]
    slots = sum(d.pop("n_slots") for d in detail.values())
    known = sum(d.pop("n_known") for d in detail.values())
    ks = sorted({max(1, int(k * f)) for f in K_FACTORS})
    summary = {
        "jaccard_mean": at_k["jaccard_mean"],
        "jaccard_std": at_k["jaccard_std"],
        "jaccard_all": at_k["jaccard_all"],
        "num_seeds": len(seeds),
        "topk_overlap_size": at_k["topk_overlap_size"],
        "topk_overlap_note": "weights in every seed's top-k set",
        "topk_union_size": at_k["topk_union_size"],
        "seeds": seeds,
        "pairs": [list(p) for p in pairs],
        "pair_order": PAIR_ORDER,
        "jaccard_note": JACCARD_NOTE,
        "jaccard_std_note": "sample standard deviation (n - 1) over the pairs",
        "topk": k,
        "mode": mode,
        "rank_correlation": {
            "method": "spearman",
            "spearman_mean": mean_std(spearman_all)[0],
            "spearman_all": spearman_all,
            "known_fraction": known / slots if slots else None,
            "note": RANK_NOTE,
        },
        "overlap_vs_k": [_overlap(tops, kk, pairs) for kk in ks],
        "overlap_vs_k_note": "the same measures at k/4, k/2, k, 2k, 4k (k per matrix in "
                             "per_layer mode; a matrix smaller than k gives all its weights)",
    }
    if mode == "per_layer":
        summary["per_layer"] = detail
    return summary


def write_summary(out_dir: Path, tops: Mapping[int, SeedTop], seeds: Sequence[int], k: int,
                  mode: str, data_free: bool = False) -> dict[str, Any]:
    """Write stability_summary.json; with one seed, skip with a note instead of failing.

    `data_free`: the metric reads no data (e.g. magnitude), so agreement across seeds is a
    tautology; the summary says so in `data_free_note` and the criteria skip it.
    """
    note = ONE_SEED_NOTE if len(seeds) < 2 else None
    if note is None and set(tops) != set(seeds):
        note = ("stability check skipped: seeds restored by --resume kept no top-4k scores; "
                "run again with --overwrite for a stability summary.")
    if note:
        log.warning(note)
        return {"skipped": note}
    summary = summarize(tops, k, mode)
    if data_free:
        summary["data_free_note"] = DATA_FREE_NOTE
    write_json(out_dir / STABILITY_SUMMARY, summary)
    return summary
