"""The bench: change the model in place, measure it with the evaluators, restore it exactly.

Every stage that asks "what does this change do to the model?" runs on one Bench: the
perturbation study (the top-k against control sets), the ablation (one weight at a time) and
the protection experiment (every matrix quantized, a chosen set kept). The bench holds what
they share: the model and its scored parameters, the evaluators and the held-out blocks they
measure on, the resume units that make each measurement happen once, and the checksums of the
unchanged parameters that every restore is checked against. A stage brings only its change, as
a context manager that applies it on entry and restores on exit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from esa_core import analysis
from esa_core.api import PER_ITEM, EvalData, Evaluator, Measure
from esa_core.errors import PluginFailure
from esa_core.guards import plugin_call
from esa_core.resume import Checkpoints

#: a change to measure: entered, it applies itself and yields its facts; left, it restores
Change = Callable[[], AbstractContextManager[dict[str, Any]]]


def measures_of(evaluators: Sequence[Evaluator]) -> list[Measure]:
    """Every evaluator's declared measures in order; the first is the primary one."""
    return [m for e in evaluators for m in e.measures()]


def evaluate_all(evaluators: Sequence[Evaluator], model: nn.Module, data: EvalData,
                 label: str) -> dict[str, Any]:
    """One model state measured by every evaluator, as one flat dict (their per-item values
    merged under one PER_ITEM key)."""
    result: dict[str, Any] = {}
    for evaluator in evaluators:
        values = dict(plugin_call(f"evaluator '{evaluator.name}' failed", evaluator.evaluate,
                                  model, data, label))
        items = values.pop(PER_ITEM, None)
        result.update(values)
        if items:
            result.setdefault(PER_ITEM, {}).update(items)
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


def declared(measures: Sequence[Measure]) -> list[dict[str, Any]]:
    """The measures as a result file describes them, for readers that know none by name."""
    return [{"name": m.name, "change_name": m.change_name,
             "higher_is_better": m.higher_is_better, "change": m.change} for m in measures]


@dataclass
class Bench:
    """The model, the parameters a stage may change, and how a change is measured."""

    model: nn.Module
    params: Mapping[str, nn.Parameter]
    evaluators: Sequence[Evaluator]
    eval_data: EvalData
    #: where each finished measurement is saved as it completes, so --resume skips it
    checkpoints: Checkpoints | None = None
    #: checksums of the unchanged parameters by id, taken once and shared by every stage: each
    #: change starts from verified-restored weights
    pristine: dict[int, int] = field(default_factory=dict)

    @property
    def measures(self) -> list[Measure]:
        return measures_of(self.evaluators)

    def on_blocks(self, blocks: torch.Tensor) -> Bench:
        """The same bench measuring on other held-out blocks (the ablation's fewer ones)."""
        data = EvalData(blocks, self.eval_data.tokenizer, self.eval_data.batch_size)
        return replace(self, eval_data=data)

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

    def baseline(self, unit: str = "baseline") -> dict[str, Any]:
        """The unchanged model's measures (one resume unit)."""
        return self.once(unit, lambda: self.evaluate("baseline"))

    def trial(self, unit: str, label: str, change: Change,
              baseline: Mapping[str, Any]) -> dict[str, Any]:
        """The model measured under `change` (one resume unit): every measure, its change
        against `baseline`, and the facts the change reported."""
        def measure() -> dict[str, Any]:
            with change() as facts:
                result = self.evaluate(label)
            return {**result, **changes(self.measures, result, baseline), "facts": facts}

        return self.once(unit, measure)
