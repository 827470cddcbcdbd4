"""The perturbation test: do the top-k weights matter more than control sets of the same size?

The baseline is evaluated once. Each condition (the super set, each control) x seed is applied
in place, evaluated, and restored from saved copies of only the touched values; a checksum of
those values before and after proves the restore bit-exact. The model is never copied.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esa_core import analysis
from esa_core.api import EvalData, Evaluator, LogicalMatrix, Measure, Perturbation, ScoredParam
from esa_core.controls import WeightIndex, control_set, overlap
from esa_core.errors import PluginFailure
from esa_core.guards import plugin_call
from esa_core.layout import (
    CONTROL_ANALYSIS,
    PERTURBATION_RESULTS,
    RANDOM_K,
    RANDOM_K_REPEATS,
    SUPER,
)
from esa_core.results import write_json
from esa_core.resume import Checkpoints
from esa_core.selection import Selection

log = logging.getLogger(__name__)


class RestoreError(RuntimeError):
    """The touched weights did not return bit-exactly: the model can no longer be trusted."""


def checksum(params: Sequence[nn.Parameter]) -> list[int]:
    """Sum of each parameter's stored bytes read as 64-bit words (wrapping), computed where it
    lives (no host copy); any one changed word changes it.

    Taken over whole parameters, it also catches a perturbation that wrote outside its set.
    The words are read in place: summing fp32 bit patterns as int32 with an int64 result
    first made an int64 copy of each parameter (1.5 s for one 58.7M-weight matrix on a CPU,
    against 0.05 s for the words), the bulk of an 8B-width perturbation stage.
    """
    return [_word_sum(_flat(p).view(torch.uint8)) for p in params]


def _word_sum(data: torch.Tensor) -> int:
    """Bytes summed as int64 words, those outside the 8-byte-aligned middle one by one."""
    head = -data.storage_offset() % 8
    middle = max(data.numel() - head, 0) // 8 * 8
    words = data[head:head + middle].view(torch.int64)
    ends = torch.cat([data[:head], data[head + middle:]]).sum(dtype=torch.int64)
    return int(words.sum()) + int(ends)


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


def measures_of(evaluators: Sequence[Evaluator]) -> list[Measure]:
    """Every evaluator's declared measures in order; the first is the primary one."""
    return [m for e in evaluators for m in e.measures()]


def evaluate_all(evaluators: Sequence[Evaluator], model: nn.Module, data: EvalData,
                 label: str) -> dict[str, Any]:
    """One model state measured by every evaluator, as one flat dict."""
    result: dict[str, Any] = {}
    for evaluator in evaluators:
        result.update(plugin_call(f"evaluator '{evaluator.name}' failed", evaluator.evaluate,
                                  model, data, label))
    missing = [m.name for m in measures_of(evaluators) if m.name not in result]
    if missing:
        raise PluginFailure(f"evaluator(s) {', '.join(e.name for e in evaluators)} declared "
                            f"the measure '{missing[0]}' but did not return it.")
    return result


def changes(measures: Sequence[Measure], result: Mapping[str, Any],
            baseline: Mapping[str, Any]) -> dict[str, float]:
    """Each measure's change against the baseline, keyed by its change_name (damage > 0)."""
    return {m.change_name: m.damage(analysis.number(result[m.name]),
                                    analysis.number(baseline[m.name])) for m in measures}


@dataclass
class Study:
    """What the perturbation test needs: the model, the sets' ingredients and the settings."""

    model: nn.Module
    params: Mapping[str, nn.Parameter]
    matrices: Sequence[LogicalMatrix]
    scores: Mapping[str, torch.Tensor]
    super_set: Selection
    evaluators: Sequence[Evaluator]
    eval_data: EvalData
    perturbation: Perturbation
    topk: int
    mode: str
    seeds: Sequence[int]
    pristine_checksums: dict[int, int] = field(default_factory=dict)
    #: where each finished evaluation is saved as it completes, so --resume skips it
    checkpoints: Checkpoints | None = None
    #: prefixes the resume units, so that several perturbation types keep theirs apart
    unit_prefix: str = ""

    @property
    def measures(self) -> list[Measure]:
        return measures_of(self.evaluators)

    def evaluate(self, label: str) -> dict[str, Any]:
        return evaluate_all(self.evaluators, self.model, self.eval_data, label)

    def once(self, unit: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """`compute()`, or its value saved by an interrupted run of the same settings."""
        unit = re.sub(r"[^A-Za-z0-9_]+", "_", unit)
        saved = self.checkpoints.load_json(unit) if self.checkpoints else None
        if saved is not None:
            return saved
        value = compute()
        if self.checkpoints:
            self.checkpoints.save_json(unit, value)
        return value

    def baseline(self) -> dict[str, Any]:
        """The unperturbed model's measures (one resume unit, shared by every type)."""
        return self.once("perturb_baseline", lambda: self.evaluate("baseline"))

    def trial(self, selection: Selection, seed: int, label: str,
              baseline: dict[str, Any], stream: str = "perturb") -> dict[str, Any]:
        """Perturb `selection` with the rule drawing on (`seed`, `stream`), evaluate, restore."""
        return self.once(f"perturb_{self.unit_prefix}{label}_seed{seed}",
                         lambda: self._trial(selection, seed, label, baseline, stream))

    def _trial(self, selection: Selection, seed: int, label: str,
               baseline: dict[str, Any], stream: str) -> dict[str, Any]:
        generator = generator_for(seed, stream)
        with perturbed(selection, self.params, self.perturbation, generator,
                       self.pristine_checksums) as facts:
            result = self.evaluate(f"{label} seed {seed}")
        return {"seed": seed, "n_weights": len(selection), **result,
                **changes(self.measures, result, baseline), "facts": facts}

    def control(self, name: str, index: WeightIndex, generator: torch.Generator) -> Selection:
        return control_set(name, self.super_set, index, self.scores, self.topk, self.mode,
                           generator)

    def run(self, controls: Sequence[str], control_repeats: int = 0,
            baseline: dict[str, Any] | None = None) -> dict[str, Any]:
        """perturbation_results.json: the baseline, then each condition over the seeds."""
        index = WeightIndex(self.matrices, self.params)
        baseline = baseline if baseline is not None else self.baseline()
        results: dict[str, Any] = {
            "perturbation": {"name": self.perturbation.name, **self.perturbation.settings},
            "mode": self.mode, "topk": self.topk, "seeds": list(self.seeds),
            "eval": {"blocks": len(self.eval_data.blocks), "tokens": baseline.get("tokens")},
            "measures": [{"name": m.name, "change_name": m.change_name,
                          "higher_is_better": m.higher_is_better, "change": m.change}
                         for m in self.measures],
            "baseline": baseline,
        }
        for name in (SUPER, *controls):
            per_seed, selection = [], None
            for seed in self.seeds:
                if name == SUPER:
                    selection = self.super_set
                elif selection is None or name == RANDOM_K:  # only random_k varies by seed
                    selection = self.control(name, index, generator_for(seed, name))
                trial = self.trial(selection, seed, name, baseline)
                if name != SUPER:
                    trial["overlap_with_super"] = overlap(selection, self.super_set, index)
                per_seed.append(trial)
            results[name] = analysis.summarise(per_seed, self.measures)
        if control_repeats:
            repeats = []
            for r in range(control_repeats):
                seed = self.seeds[r % len(self.seeds)]
                selection = self.control(RANDOM_K, index,
                                         generator_for(seed, f"{RANDOM_K}/repeat{r}"))
                # a fresh perturbation stream too: a stochastic rule's draws are independent
                repeats.append(self.trial(selection, seed, f"{RANDOM_K} repeat {r}", baseline,
                                          stream=f"perturb/repeat{r}"))
            results[RANDOM_K_REPEATS] = repeats
        return results


@dataclass(frozen=True)
class StudySettings:
    """The run's choices the perturbation stage needs (the stage reads no RunConfig)."""

    topk: int
    mode: str
    seeds: Sequence[int]
    controls: Sequence[str]
    control_repeats: int = 0


def run_stage(model: nn.Module, scored: Sequence[ScoredParam],
              scores: Mapping[str, torch.Tensor], super_set: Selection,
              perturbations: Sequence[Perturbation], evaluators: Sequence[Evaluator],
              data: EvalData, settings: StudySettings, out_dir: Path,
              checkpoints: Checkpoints | None = None) -> list[dict]:
    """The pipeline's evaluation stage: run the study once per perturbation type against the
    same controls, write its files, return the criteria rows.

    One type keeps the classic shape of perturbation_results.json; several put one such
    section per type under `by_perturbation` (and the same in control_analysis.json).
    """
    several = len(perturbations) > 1
    pristine: dict[int, int] = {}
    sections, analyses = {}, {}
    baseline = None
    for perturbation in perturbations:
        study = Study(
            model=model, params={s.name: s.param for s in scored},
            matrices=[m for s in scored for m in s.matrices], scores=scores,
            super_set=super_set, evaluators=evaluators, eval_data=data,
            perturbation=perturbation, topk=settings.topk, mode=settings.mode,
            seeds=settings.seeds,
            pristine_checksums=pristine, checkpoints=checkpoints,
            unit_prefix=f"{perturbation.name}_" if several else "")
        baseline = baseline if baseline is not None else study.baseline()
        sections[perturbation.name] = study.run(settings.controls, settings.control_repeats,
                                                baseline)
        if settings.controls:
            analyses[perturbation.name] = analysis.analyse(sections[perturbation.name],
                                                           study.measures)
    rows, measures = [], measures_of(evaluators)
    for name in sections:
        rows += analysis.phase3_criteria(analyses.get(name), measures, name if several else "")
    rows.append(analysis.robustness_row({name: analyses.get(name) for name in sections},
                                        measures))
    if several:
        results = {"perturbations": list(sections), "baseline": baseline,
                   "by_perturbation": sections}
        control = {"perturbations": list(sections), "by_perturbation": analyses}
    else:
        results, control = next(iter(sections.values())), next(iter(analyses.values()), None)
    write_json(out_dir / PERTURBATION_RESULTS, results)
    if settings.controls:
        write_json(out_dir / CONTROL_ANALYSIS, {**control, "success_criteria": rows})
    return rows
