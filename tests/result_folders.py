"""Result folders for the plot and report tests, written by ESA's own writers (no model needed).

Scores and weights are synthetic but shaped like a real run's: heavy-tailed scores with a few
planted outliers, per-matrix statistics from `sensitivity_stats`, the top-k from `select`, and
stability/perturbation files with the keys the stability and perturbation stages write.
"""

from __future__ import annotations

from itertools import combinations
from pathlib import Path

import torch

from esa_core.api import LogicalMatrix
from esa_core.layout import read_json
from esa_core.pipeline import csv_rows
from esa_core.results import write_csv, write_json
from esa_core.selection import select
from esa_core.stats import sensitivity_stats

DENSE = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
MOE_SHARED = ("attn.q", "attn.k", "attn.v", "attn.o", "moe.router")
MOE_EXPERT = ("moe.gate", "moe.up", "moe.down")
SEEDS = (1337, 123, 999)


def _model(layers: int, experts: int, shape=(16, 24), seed: int = 0):
    """Matrices, heavy-tailed scores (|g·w|-like) and weights, with planted super weights."""
    g = torch.Generator().manual_seed(seed)
    matrices, scores, weights = [], {}, {}
    for layer in range(layers):
        comps = DENSE if not experts else MOE_SHARED + MOE_EXPERT
        for comp in comps:
            name = f"model.layers.{layer}.{comp.replace('.', '_')}.weight"
            n_exp = experts if comp in MOE_EXPERT else 0
            full = (n_exp, *shape) if n_exp else shape
            w = torch.randn(full, generator=g) * 0.02
            s = torch.randn(full, generator=g).abs() ** 3 * 1e-6 * (1 + layer % 5)
            if comp.endswith("down") and layer == 2:  # a super weight: big |w|, huge score
                w.view(-1)[7] = 2.5
                s.view(-1)[7] = 0.3
            weights[name], scores[name] = w, s
            matrices += ([LogicalMatrix(name, layer, comp, e) for e in range(n_exp)] if n_exp
                         else [LogicalMatrix(name, layer, comp)])
    return matrices, scores, weights


def manifest(model_id: str, topk: int, mode: str, argv: list[str]) -> dict:
    return {
        "esa_version": "0.1.0", "argv": argv,
        "config": {"model": f"/nonexistent/{model_id}", "metric": "grad_x_weight", "mode": mode,
                   "topk": topk, "max_samples": 16, "seeds": list(SEEDS),
                   "stability_check": True, "save_plots": True, "perturb": "sign_flip",
                   "controls": ["random_k", "bottom_k"], "seq_len": 128, "eval_samples": 16},
        "model": {"id": model_id, "source": "local", "model_type": "llama",
                  "n_params": 134515008, "n_scored": 106168320, "n_matrices": 210,
                  "dtype": "float32", "adapter": "llama"},
        "data": {"source": "wikitext2 (bundled: valid -> calibration, test -> evaluation)",
                 "sha256": "ee8e179331812a9025fac9f2602faeb12e773d051d55ee6e50ce15da3bc784c1",
                 "seq_len": 128, "n_calibration_pool": 2139, "n_eval": 16, "n_calibration": 16},
        "seeds": {str(s): {"calibration_blocks": [1, 2, 3]} for s in SEEDS},
        "environment": {"python": "3.11.2", "torch": "2.13.0", "transformers": "5.24.0",
                        "device": "cpu"},
        "plugins": [], "started_at": "2026-11-25T14:00:00+00:00",
        "finished_at": "2026-11-25T14:01:30+00:00", "status": "complete",
        "last_completed_stage": "plots",
        "timings": {"load_s": 4.1, "data_s": 1.2, "scoring_s": 40.3, "selection_s": 2.2,
                    "stability_s": 0.4, "evaluation_s": 30.5, "plots_s": 3.1, "total_s": 81.8},
    }


def write_core(folder: Path, layers: int = 30, experts: int = 0, topk: int = 20,
               mode: str = "per_layer", model_id: str = "SmolLM2-135M-Instruct",
               shape: tuple[int, int] = (16, 24)) -> dict:
    """manifest, sensitivity_stats.json and top_weights.csv of a synthetic run."""
    matrices, scores, weights = _model(layers, experts, shape)
    selection = select(scores, matrices, topk, mode)
    write_csv(folder / "top_weights.csv", csv_rows(selection, weights))
    write_json(folder / "sensitivity_stats.json", sensitivity_stats(scores, matrices, weights))
    argv = ["esa", "run", "--model", model_id, "--topk", str(topk), "--mode", mode,
            "--save-plots", "--perturb", "sign_flip", "--controls", "random_k,bottom_k",
            "--seeds", ",".join(map(str, SEEDS)), "--stability-check"]
    m = manifest(model_id, topk, mode, argv)
    write_json(folder / "experiment_manifest.json", m)
    return {"matrices": matrices, "scores": scores, "weights": weights, "manifest": m}


def write_stability(folder: Path, core: dict, topk: int) -> dict:
    """stability_summary.json from real per-seed top-k sets of noisy copies of the scores."""
    keys = {}
    for seed in SEEDS:
        g = torch.Generator().manual_seed(seed)
        noisy = {n: s * torch.exp(0.4 * torch.randn(s.shape, generator=g))
                 for n, s in core["scores"].items()}
        keys[seed] = {kk: _keyset(select(noisy, core["matrices"], kk, "per_layer"))
                      for kk in (topk // 4, topk // 2, topk, 2 * topk, 4 * topk)}
    pairs = list(combinations(SEEDS, 2))

    def overlap(kk: int) -> dict:
        jac = [len(keys[a][kk] & keys[b][kk]) / len(keys[a][kk] | keys[b][kk]) for a, b in pairs]
        mean = sum(jac) / len(jac)
        std = (sum((j - mean) ** 2 for j in jac) / len(jac)) ** 0.5
        every = set.intersection(*(keys[s][kk] for s in SEEDS))
        union = set.union(*(keys[s][kk] for s in SEEDS))
        return {"k": kk, "jaccard_mean": mean, "jaccard_std": std, "jaccard_all": jac,
                "topk_overlap_size": len(every), "topk_union_size": len(union)}

    at_k = overlap(topk)
    summary = {**{k: at_k[k] for k in ("jaccard_mean", "jaccard_std", "jaccard_all",
                                       "topk_overlap_size", "topk_union_size")},
               "num_seeds": len(SEEDS), "seeds": list(SEEDS), "pairs": [list(p) for p in pairs],
               "topk": topk, "mode": "per_layer",
               "overlap_vs_k": [overlap(kk) for kk in sorted(next(iter(keys.values())))]}
    write_json(folder / "stability_summary.json", summary)
    return summary


def _keyset(selection) -> set:
    return {(p.matrix.key, int(r), int(c)) for p in selection.picks
            for r, c in zip(p.rows, p.cols)}


def _condition(ppl_changes: list[float | None], accuracy_drops: list[float], base: dict) -> dict:
    per_seed = []
    for seed, change, drop in zip(SEEDS, ppl_changes, accuracy_drops):
        ppl = None if change is None else base["ppl"] * (1 + change)
        trial = {"seed": seed, "n_weights": 4200, "ppl": ppl, "accuracy": base["accuracy"] - drop,
                 "ppl_change": change, "accuracy_drop": drop,
                 "nonfinite_outputs": change is None}
        if change is None:
            trial.update(ppl_nonfinite="nan", ppl_change_nonfinite="nan")
        per_seed.append(trial)
    finite = [c for c in ppl_changes if c is not None]
    mean = sum(finite) / len(finite) if finite else None
    return {"ppl_change": mean, "accuracy_drop": sum(accuracy_drops) / len(accuracy_drops),
            "ppl": None if mean is None else base["ppl"] * (1 + mean),
            "accuracy": base["accuracy"] - sum(accuracy_drops) / len(accuracy_drops),
            "nonfinite_seeds": len(ppl_changes) - len(finite), "per_seed": per_seed}


def write_perturbation(folder: Path, super_changes=(41.7, 38.2, 44.9)) -> dict:
    """perturbation_results.json, control_analysis.json, and the manifest's criteria rows."""
    base = {"loss": 2.93, "ppl": 18.73, "accuracy": 0.4123, "tokens": 2032,
            "nonfinite_outputs": False}
    results = {
        "perturbation": {"name": "sign_flip", "scale": 1.0, "prob": 0.05},
        "mode": "per_layer", "topk": 20, "seeds": list(SEEDS),
        "eval": {"blocks": 16, "tokens": 2032},
        "measures": [{"name": "ppl", "change_name": "ppl_change", "higher_is_better": False,
                      "change": "relative"},
                     {"name": "accuracy", "change_name": "accuracy_drop",
                      "higher_is_better": True, "change": "difference"}],
        "baseline": base,
        "super_weights": _condition(list(super_changes), [0.271, 0.262, 0.284], base),
        "random_k": _condition([0.0021, 0.0035, 0.0012], [0.0005, 0.0010, -0.0005], base),
        "bottom_k": _condition([1e-6, 2e-6, 1.5e-6], [0.0, 0.0, 0.0], base),
    }
    write_json(folder / "perturbation_results.json", results)
    criteria = [
        {"criterion": "stability: jaccard_mean", "value": 0.41, "threshold": "> 0.3",
         "verdict": "PASS", "note": "3 seed pairs, top-20"},
        {"criterion": "stability: jaccard_std", "value": 0.21, "threshold": "< 0.15",
         "verdict": "FAIL", "note": "3 seed pairs, top-20"},
        {"criterion": "separation: dPPL(super) > dPPL(random) > dPPL(bottom)",
         "value": "41.6 > 0.00227 > 1.5e-06", "threshold": "strictly decreasing",
         "verdict": "PASS"},
    ]
    write_json(folder / "control_analysis.json",
               {"separation": {"super_vs_random": 18300.0}, "success_criteria": criteria})
    path = folder / "experiment_manifest.json"
    write_json(path, {**read_json(path), "success_criteria": criteria})
    return results


def full_run(folder: Path, **core_settings) -> Path:
    """A complete result folder: every file a run with all stages writes."""
    folder.mkdir(parents=True, exist_ok=True)
    core = write_core(folder, **core_settings)
    write_stability(folder, core, core["manifest"]["config"]["topk"])
    write_perturbation(folder)
    write_ablation(folder)
    write_protection(folder)
    return folder


def write_protection(folder: Path) -> dict:
    """protection_results.json as the --protect stage writes it: rtn at 3 bits, nothing kept,
    then the top-k and two controls at k = 5, 20, 100 per matrix, with its criteria rows."""
    from esa_core.api import DIFFERENCE, RELATIVE, Measure
    from esa_core.protection import criteria_rows, recovered

    measures = [Measure("ppl", "ppl_change", False, RELATIVE),
                Measure("accuracy", "accuracy_drop", True, DIFFERENCE)]
    base = {"ppl": 18.73, "accuracy": 0.4123, "tokens": 2032}

    def condition(change: float, k: int) -> dict:
        c = _condition([change] * len(SEEDS), [0.05 * change] * len(SEEDS), base)
        c["std"] = {"ppl_change": 0.0, "accuracy_drop": 0.0}
        return {"k": k, "n_kept": 210 * k, **c}

    nothing = condition(4.2, 0)
    results = {
        "rule": {"name": "rtn", "bits": 3, "group_size": 64}, "mode": "per_layer",
        "sizes": [5, 20, 100], "seeds": list(SEEDS), "matrices": 210,
        "scored_weights": 106168320, "eval": {"blocks": 16, "tokens": 2032},
        "measures": [{"name": m.name, "change_name": m.change_name,
                      "higher_is_better": m.higher_is_better, "change": m.change}
                     for m in measures],
        "baseline": base, "nothing_kept": nothing,
    }
    for name, changes in (("super_weights", (2.1, 0.9, 0.4)), ("random_k", (4.19, 4.2, 4.15)),
                          ("magnitude_k", (3.9, 3.1, 2.2))):
        results[name] = [condition(c, k) for c, k in zip(changes, (5, 20, 100))]
        for c in results[name]:
            c["recovered"] = recovered(c, nothing, measures)
    rows = criteria_rows(results, measures)
    write_json(folder / "protection_results.json", {**results, "success_criteria": rows})
    return results


def write_ablation(folder: Path, ratios=(7.8, 2.6, 1.3, 1.01, 0.99)) -> None:
    """ablation.csv and the manifest's `ablation` entry for the top weights' removal."""
    from esa_core.ablation import columns
    from esa_core.api import DIFFERENCE, RELATIVE, Measure
    from esa_core.layout import read_top_weights

    measures = [Measure("ppl", "ppl_change", False, RELATIVE),
                Measure("accuracy", "accuracy_drop", True, DIFFERENCE)]
    top = read_top_weights(folder)[:len(ratios)]
    order = [2, 1, 3, 4, 5]  # score ranks, ranked by effect
    rows = []
    for rank, (ratio, score_rank) in enumerate(zip(ratios, order), start=1):
        w = top[score_rank - 1]
        rows.append({**{k: w[k] for k in ("param", "layer", "component", "expert", "row",
                                          "col", "score", "weight")},
                     "rank": rank, "score_rank": score_rank, "ppl": repr(18.73 * ratio),
                     "ppl_ratio": repr(ratio), "accuracy_drop": repr(0.01 * ratio)})
    write_csv(folder / "ablation.csv", rows, columns(measures))
    path = folder / "experiment_manifest.json"
    entry = {"file": "ablation.csv", "candidates": len(rows), "eval_blocks": 8,
             "measure": "ppl", "baseline": {"ppl": 18.73}, "critical_ratio": 2.0,
             "critical_weights": [{"rank": r["rank"], "param": r["param"], "expert": None,
                                   "row": r["row"], "col": r["col"],
                                   "score_rank": r["score_rank"], "ratio": float(r["ppl_ratio"])}
                                  for r in rows[:2]],
             "spearman_score_vs_effect": 0.9, "spearman_p_value": 0.04}
    write_json(path, {**read_json(path), "ablation": entry})
