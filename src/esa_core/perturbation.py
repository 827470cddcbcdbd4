"""The perturbation test: do the top-k weights matter more than control sets of the same size?

The baseline is evaluated once. Each condition (the super set, each control) x seed is applied
in place, evaluated, and restored from saved copies of only the touched values; a checksum of
those values before and after proves the restore bit-exact. The model is never copied.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import statistics
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esa_core import criteria
from esa_core.api import LogicalMatrix, Perturbation
from esa_core.checkpoints import Checkpoints
from esa_core.controls import WeightIndex, control_set, overlap
from esa_core.errors import PluginFailure
from esa_core.evaluation import Evaluation, evaluate
from esa_core.guards import plugin_call
from esa_core.layout import CONTROL_ANALYSIS, PERTURBATION_RESULTS, SUPER
from esa_core.results import write_json
from esa_core.selection import Selection

log = logging.getLogger(__name__)

SEPARATION = 3.0  # the guide: super-weight perturbations cause >= 3x the impact of random ones
Z_ABOVE_NOISE = 3.0  # super effect at least 3 standard deviations above the random controls
CONTROL_SHORT = {"random_k": "random", "bottom_k": "bottom", "magnitude_k": "magnitude"}


class RestoreError(RuntimeError):
    """The touched weights did not return bit-exactly: the model can no longer be trusted."""


INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksum(params: Sequence[nn.Parameter]) -> list[int]:
    """Integer sum of each parameter's bit patterns, computed where it lives (no host copy).

    Taken over whole parameters, it also catches a perturbation that wrote outside its set.
    """
    return [int(p.detach().view(INT_VIEW[p.element_size()]).sum(dtype=torch.int64))
            for p in params]


def _flat(param: nn.Parameter) -> torch.Tensor:
    return param.detach().view(-1)  # a view: raises rather than write into a copy


@contextmanager
def perturbed(selection: Selection, params: Mapping[str, nn.Parameter],
              perturbation: Perturbation, generator: torch.Generator,
              pristine: dict[int, int] | None = None) -> Iterator[dict[str, int]]:
    """Perturb `selection` in place for the `with` body; yield the summed facts; restore exactly.

    Only the selected values are saved. Raises RestoreError if the touched parameters' checksum
    differs afterwards. `pristine` caches the unperturbed checksums (by parameter id) across
    conditions: every condition starts from the verified-restored weights, so each parameter's
    "before" is taken once per study instead of once per condition.
    """
    touched = []
    for picks in selection.picks:
        param = params[picks.matrix.param]
        index = picks.flat(param.shape).to(param.device)
        touched.append((picks.matrix, param, index, _flat(param)[index].clone()))
    owners = list({id(param): param for _, param, _, _ in touched}.values())
    cache = {} if pristine is None else pristine
    missing = [p for p in owners if id(p) not in cache]
    cache.update(zip(map(id, missing), checksum(missing)))
    before = [cache[id(p)] for p in owners]
    facts: dict[str, int] = {}
    try:
        for matrix, param, index, original in touched:
            new, found = plugin_call(f"perturbation '{perturbation.name}' failed",
                                     perturbation.perturb, original.clone(),
                                     matrix.view(param.detach()), generator)
            if new.shape != original.shape or new.dtype != original.dtype:
                raise PluginFailure(
                    f"perturbation '{perturbation.name}' returned {new.dtype} {tuple(new.shape)}"
                    f" for {original.dtype} {tuple(original.shape)}")
            _flat(param)[index] = new.to(param.device)
            for key, value in found.items():
                facts[key] = facts.get(key, 0) + value
        yield facts
    finally:
        for _, param, index, original in touched:
            _flat(param)[index] = original
        if checksum(owners) != before:
            raise RestoreError(f"the weights touched by '{perturbation.name}' did not return "
                               "bit-exactly (checksum differs after restoring).")


def generator_for(seed: int, purpose: str) -> torch.Generator:
    """A CPU generator for one use of one seed: the same (seed, purpose) always draws the same."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


@dataclass
class Study:
    """What the perturbation test needs: the model, the sets' ingredients and the settings."""

    model: nn.Module
    params: Mapping[str, nn.Parameter]
    matrices: Sequence[LogicalMatrix]
    scores: Mapping[str, torch.Tensor]
    super_set: Selection
    eval_blocks: torch.Tensor
    perturbation: Perturbation
    topk: int
    mode: str
    seeds: Sequence[int]
    batch_size: int = 1
    progress: bool = False
    pristine_checksums: dict[int, int] = field(default_factory=dict)
    #: where each finished evaluation is saved as it completes, so --resume skips it
    checkpoints: Checkpoints | None = None

    def evaluate(self, label: str) -> Evaluation:
        return evaluate(self.model, self.eval_blocks, self.batch_size, self.progress, label)

    def _once(self, unit: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`compute()`, or its value saved by an interrupted run of the same settings."""
        unit = "perturb_" + re.sub(r"[^A-Za-z0-9_]+", "_", unit)
        saved = self.checkpoints.load_json(unit) if self.checkpoints else None
        if saved is not None:
            return saved
        value = compute()
        if self.checkpoints:
            self.checkpoints.save_json(unit, value)
        return value

    def trial(self, selection: Selection, seed: int, label: str,
              baseline: Evaluation) -> dict[str, Any]:
        """Perturb `selection` with the rule seeded by `seed`, evaluate, restore."""
        return self._once(f"{label}_seed{seed}",
                          lambda: self._trial(selection, seed, label, baseline))

    def _trial(self, selection: Selection, seed: int, label: str,
               baseline: Evaluation) -> dict[str, Any]:
        generator = generator_for(seed, "perturb")
        with perturbed(selection, self.params, self.perturbation, generator,
                       self.pristine_checksums) as facts:
            result = self.evaluate(f"{label} seed {seed}")
        return {
            "seed": seed,
            "n_weights": len(selection),
            **result.to_dict(),
            "ppl_change": result.ppl / baseline.ppl - 1.0,
            "accuracy_drop": baseline.accuracy - result.accuracy,
            "facts": facts,
        }

    def control(self, name: str, index: WeightIndex, generator: torch.Generator) -> Selection:
        return control_set(name, self.super_set, index, self.scores, self.topk, self.mode,
                           generator)

    def run(self, controls: Sequence[str], control_repeats: int = 0) -> dict[str, Any]:
        """perturbation_results.json: the baseline, then each condition over the seeds."""
        index = WeightIndex(self.matrices, self.params)
        baseline = Evaluation(**self._once("baseline",
                                           lambda: self.evaluate("baseline").to_dict()))
        results: dict[str, Any] = {
            "perturbation": {"name": self.perturbation.name, **self.perturbation.settings},
            "mode": self.mode, "topk": self.topk, "seeds": list(self.seeds),
            "eval": {"blocks": len(self.eval_blocks), "tokens": baseline.tokens},
            "baseline": baseline.to_dict(),
        }
        for name in (SUPER, *controls):
            per_seed, selection = [], None
            for seed in self.seeds:
                if name == SUPER:
                    selection = self.super_set
                elif selection is None or name == "random_k":  # only random_k varies by seed
                    selection = self.control(name, index, generator_for(seed, name))
                trial = self.trial(selection, seed, name, baseline)
                if name != SUPER:
                    trial["overlap_with_super"] = overlap(selection, self.super_set, index)
                per_seed.append(trial)
            results[name] = summarise(per_seed)
        if control_repeats:
            repeats = []
            for r in range(control_repeats):
                seed = self.seeds[r % len(self.seeds)]
                selection = self.control("random_k", index,
                                         generator_for(seed, f"random_k/repeat{r}"))
                repeats.append(self.trial(selection, seed, f"random_k repeat {r}", baseline))
            results["random_k_repeats"] = repeats
        return results


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, (0.0 if len(values) < 2 else math.nan)
    return mean, statistics.stdev(values)


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition: means over seeds up front (the guide's keys), then per_seed, mean, std."""
    keys = ("ppl_change", "accuracy_drop", "ppl", "accuracy", "loss")
    mean, std = {}, {}
    for key in keys:
        mean[key], std[key] = _mean_std([float(t[key]) for t in per_seed])
    return {
        "ppl_change": mean["ppl_change"], "accuracy_drop": mean["accuracy_drop"],
        "ppl": mean["ppl"], "accuracy": mean["accuracy"],
        "nonfinite_seeds": sum(t["nonfinite_outputs"] or not math.isfinite(t["ppl"])
                               for t in per_seed),
        "per_seed": per_seed, "mean": mean, "std": std,
    }


# --------------------------------------------------------------------------- analysis


def _damage(value: float | None) -> float:
    """ppl_change for comparisons: a model whose outputs became non-finite is broken (+inf)."""
    return math.inf if value is None or math.isnan(value) else value


def _ratio(a: float, b: float) -> float:
    a, b = _damage(a), _damage(b)
    if math.isinf(a) and math.isinf(b):
        return math.nan
    if b <= 0.0:
        return math.inf if a > 0.0 else math.nan
    return a / b


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """control_analysis.json: separation ratios, the controls' spread, significance."""
    changes = {name: _damage(results[name]["ppl_change"])
               for name in (SUPER, *CONTROL_SHORT) if name in results}
    separation = {f"super_vs_{short}": _ratio(changes[SUPER], changes[name])
                  for name, short in CONTROL_SHORT.items() if name in changes}
    if "random_k" in changes and "bottom_k" in changes:
        separation["random_vs_bottom"] = _ratio(changes["random_k"], changes["bottom_k"])
    spread = {}
    for name in CONTROL_SHORT:
        if name in results:
            values = [_damage(t["ppl_change"]) for t in results[name]["per_seed"]]
            mean, std = _mean_std(values)
            spread[name] = {"ppl_change_mean": mean, "ppl_change_std": std,
                            "ppl_change_min": min(values), "ppl_change_max": max(values),
                            "draws": len(values)}
    analysis: dict[str, Any] = {"ppl_change": changes, "separation": separation,
                                "spread": spread}
    if "random_k" in results:
        analysis["significance"] = significance(results)
    if "magnitude_k" in results:
        analysis["magnitude_overlap_with_super"] = \
            results["magnitude_k"]["per_seed"][0]["overlap_with_super"]
    return analysis


def significance(results: dict[str, Any]) -> dict[str, Any]:
    """How far the super effect lies from the random controls' effects (seeds and repeats).

    z: distance from the random draws' mean in their standard deviations. p: the permutation
    style rank, (1 + draws at least as damaging as the super set) / (1 + draws): with N random
    draws it cannot be below 1/(N+1), so --control-repeats sets how small p can get.
    """
    super_change = _damage(results[SUPER]["ppl_change"])
    draws = [_damage(t["ppl_change"]) for t in results["random_k"]["per_seed"]]
    draws += [_damage(t["ppl_change"]) for t in results.get("random_k_repeats", [])]
    mean, std = _mean_std(draws)
    if math.isinf(super_change) and not math.isinf(mean):
        z = math.inf
    elif std > 0.0 and math.isfinite(std):
        z = (super_change - mean) / std
    else:
        z = math.nan
    at_least = sum(d >= super_change for d in draws)
    return {"random_draws": len(draws), "random_ppl_changes": draws,
            "random_mean": mean, "random_std": std, "z_score": z,
            "p_value": (1 + at_least) / (1 + len(draws)), "p_value_floor": 1 / (1 + len(draws))}


def phase3_criteria(analysis: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The guide's Phase 3 success criteria, as `criteria` rows."""
    changes = (analysis or {}).get("ppl_change", {})
    sep = (analysis or {}).get("separation", {})
    sig = (analysis or {}).get("significance")
    needs = "run with --controls random_k,bottom_k"
    ordering = "separation: dPPL(super) > dPPL(random) > dPPL(bottom)"
    magnitude = "magnitude: dPPL(super) / dPPL(random)"
    significance = "significance: z of dPPL(super) over the random controls"
    rows = []
    if "random_k" in changes and "bottom_k" in changes:
        order = [changes[SUPER], changes["random_k"], changes["bottom_k"]]
        rows.append(criteria.check(ordering, order[0] > order[1] > order[2], "==", True,
                                   " > ".join(_fmt(v) for v in order)))
    else:
        rows.append(criteria.skipped(ordering, "==", True, needs))
    if "super_vs_random" in sep:
        rows.append(criteria.check(magnitude, sep["super_vs_random"], ">=", SEPARATION))
        rows.append(criteria.check(significance, sig["z_score"], ">=", Z_ABOVE_NOISE))
    else:
        rows.append(criteria.skipped(magnitude, ">=", SEPARATION, needs))
        rows.append(criteria.skipped(significance, ">=", Z_ABOVE_NOISE, needs))
    return rows


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_stage(study: Study, controls: Sequence[str], control_repeats: int,
              out_dir: Path) -> list[dict]:
    """The pipeline's evaluation stage: run the study, write its files, return the criteria."""
    results = study.run(controls, control_repeats)
    write_json(out_dir / PERTURBATION_RESULTS, results)
    analysis = analyse(results) if controls else None
    rows = phase3_criteria(analysis)
    if analysis is not None:
        write_json(out_dir / CONTROL_ANALYSIS, {**analysis, "success_criteria": rows})
    return rows
