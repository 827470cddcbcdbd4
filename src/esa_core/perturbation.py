"""The perturbation test: do the top-k weights matter more than control sets of the same size?

The baseline is evaluated once. Each condition (the super set, each control) x seed is applied
in place, evaluated on the bench, and restored from saved copies of only the touched values; a
checksum of those values before and after proves the restore bit-exact. The model is never
copied.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esa_core import analysis
from esa_core.api import LogicalMatrix, Perturbation
from esa_core.bench import Bench, declared
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


@dataclass
class Study:
    """The perturbation test on a bench: the top-k set and the ingredients of its controls."""

    bench: Bench
    matrices: Sequence[LogicalMatrix]
    scores: Mapping[str, torch.Tensor]
    super_set: Selection
    perturbation: Perturbation
    topk: int
    mode: str
    seeds: Sequence[int]
    #: prefixes the resume units, so that several perturbation types keep theirs apart
    unit_prefix: str = ""

    def trial(self, selection: Selection, seed: int, label: str,
              baseline: dict[str, Any], stream: str = "perturb") -> dict[str, Any]:
        """Perturb `selection` with the rule drawing on (`seed`, `stream`), evaluate, restore."""
        bench = self.bench
        measured = bench.trial(
            f"perturb_{self.unit_prefix}{label}_seed{seed}", f"{label} seed {seed}",
            lambda: perturbed(selection, bench.params, self.perturbation,
                              generator_for(seed, stream), bench.pristine),
            baseline)
        return {"seed": seed, "n_weights": len(selection), **measured}

    def control(self, name: str, index: WeightIndex, generator: torch.Generator) -> Selection:
        return control_set(name, self.super_set, index, self.scores, self.topk, self.mode,
                           generator)

    def run(self, controls: Sequence[str], control_repeats: int,
            baseline: dict[str, Any]) -> dict[str, Any]:
        """perturbation_results.json: the baseline, then each condition over the seeds."""
        index = WeightIndex(self.matrices, self.bench.params)
        results: dict[str, Any] = {
            "perturbation": {"name": self.perturbation.name, **self.perturbation.settings},
            "mode": self.mode, "topk": self.topk, "seeds": list(self.seeds),
            "eval": {"blocks": len(self.bench.eval_data.blocks),
                     "tokens": baseline.get("tokens")},
            "measures": declared(self.bench.measures),
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
            results[name] = analysis.summarise(per_seed, self.bench.measures)
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


def run_stage(bench: Bench, matrices: Sequence[LogicalMatrix],
              scores: Mapping[str, torch.Tensor], super_set: Selection,
              perturbations: Sequence[Perturbation], settings: StudySettings,
              out_dir: Path) -> list[dict]:
    """The pipeline's evaluation stage: run the study once per perturbation type against the
    same controls, write its files, return the criteria rows.

    One type keeps the classic shape of perturbation_results.json; several put one such
    section per type under `by_perturbation` (and the same in control_analysis.json).
    """
    several = len(perturbations) > 1
    sections, analyses = {}, {}
    baseline = bench.baseline()
    measures = bench.measures
    for perturbation in perturbations:
        study = Study(bench=bench, matrices=matrices, scores=scores, super_set=super_set,
                      perturbation=perturbation, topk=settings.topk, mode=settings.mode,
                      seeds=settings.seeds,
                      unit_prefix=f"{perturbation.name}_" if several else "")
        sections[perturbation.name] = study.run(settings.controls, settings.control_repeats,
                                                baseline)
        if settings.controls:
            analyses[perturbation.name] = analysis.analyse(sections[perturbation.name],
                                                           measures)
    rows = []
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
