"""--protect RULE: does keeping the critical weights exact make the model robust to a change of
every weight? The guide's fourth extension, in the form quantization research asks it (SpQR,
SqueezeLLM, the super-weight paper's restored super weight after round-to-nearest).

The rule (e.g. `rtn`) is applied to every scored matrix, on the bench, under these kept sets:
nothing; then for each size k of --protect-k, the first k of the top-k ranking (per matrix in
per_layer, in total in global, so each smaller set is inside the larger) and each --controls
set of the same size. Each set x seed is one resume unit, evaluated and restored bit-exactly.
What a kept set buys is the share of the damage recovered against keeping nothing:
1 - change(kept) / change(nothing kept), per measure. The criteria compare damages, never a
ratio: keeping the top-k must leave less damage than keeping a control set of the same size,
judged on the paired interval over evaluation items of the control-kept model's change against
the top-k-kept model (PASS when it lies above 0), or on the means where no interval exists.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esa_core import analysis, criteria, intervals
from esa_core.api import Measure, Perturbation
from esa_core.bench import Bench, declared
from esa_core.controls import WeightIndex, control_set, overlap
from esa_core.layout import CONTROLS, NOTHING_KEPT, PROTECTED_WEIGHTS, PROTECTION_RESULTS, SUPER
from esa_core.perturbation import generator_for
from esa_core.results import atomic_path, write_json
from esa_core.rewrite import Originals, rewritten
from esa_core.selection import Selection

#: the control sets the guide's question names; a row each, a SKIP when not run
JUDGED_CONTROLS = ("random_k", "magnitude_k")
#: the originals' folder under checkpoints/, there only while the stage runs
ORIGINALS = "protect_originals"


@dataclass(frozen=True)
class ProtectSettings:
    """The run's choices the protection stage needs (the stage reads no RunConfig)."""

    sizes: Sequence[int]
    mode: str
    seeds: Sequence[int]
    controls: Sequence[str]


def run_stage(bench: Bench, matrices, scores: Mapping[str, torch.Tensor], top: Selection,
              rule: Perturbation, settings: ProtectSettings, scratch: Path,
              out_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Write protection_results.json and protected_weights.safetensors; return the criteria
    rows and the manifest's entry. `scratch` holds the originals while the stage runs."""
    originals = Originals(scratch, matrices, bench.params)
    originals.save()
    try:
        sizes = sorted(settings.sizes)
        export(top.prefix(sizes[-1], settings.mode), bench.params, settings.mode, sizes[-1],
               out_dir / PROTECTED_WEIGHTS)
        results = _conditions(bench, originals, scores, top, rule, settings, sizes)
    finally:
        originals.remove()
    rows = criteria_rows(results, bench.measures)
    write_json(out_dir / PROTECTION_RESULTS, {**results, "success_criteria": rows})
    entry = {"file": PROTECTION_RESULTS, "kept_file": PROTECTED_WEIGHTS,
             "rule": results["rule"], "sizes": sizes}
    return rows, entry


def _conditions(bench: Bench, originals: Originals, scores, top: Selection, rule: Perturbation,
                settings: ProtectSettings, sizes: list[int]) -> dict[str, Any]:
    """The baseline, nothing kept, then every kept set x size, each over the seeds."""
    measures = bench.measures
    baseline = bench.baseline()
    index = WeightIndex(originals.matrices, bench.params)

    def trials(name: str, k: int, sets: dict[int, Selection]) -> list[dict[str, Any]]:
        out = []
        for seed in settings.seeds:
            kept = sets[seed]
            measured = bench.trial(
                f"protect_{name}_k{k}_seed{seed}", f"{rule.name}, {name} k={k} seed {seed}",
                lambda kept=kept, seed=seed: rewritten(originals, rule, kept,
                                                       generator_for(seed, "protect"),
                                                       bench.pristine),
                baseline)
            out.append({"seed": seed, "n_kept": len(kept), **measured})
        return out

    nothing = analysis.summarise(
        trials(NOTHING_KEPT, 0, dict.fromkeys(settings.seeds, Selection([]))), measures)
    results: dict[str, Any] = {
        "rule": {"name": rule.name, **rule.settings},
        "mode": settings.mode, "sizes": sizes, "seeds": list(settings.seeds),
        "matrices": len(originals.matrices), "scored_weights": index.total,
        "eval": {"blocks": len(bench.eval_data.blocks), "tokens": baseline.get("tokens")},
        "measures": declared(measures),
        "baseline": baseline,
        NOTHING_KEPT: {**nothing, "intervals": _intervals(measures, baseline, nothing)},
    }
    for name in (SUPER, *settings.controls):
        results[name] = []
        for k in sizes:
            kept_top = top.prefix(k, settings.mode)
            sets = _kept_sets(name, kept_top, index, scores, k, settings)
            per_seed = trials(name, k, sets)
            if name != SUPER:
                for trial, seed in zip(per_seed, settings.seeds):
                    trial["overlap_with_super"] = overlap(sets[seed], kept_top, index)
            summary = analysis.summarise(per_seed, measures)
            results[name].append({"k": k, "n_kept": per_seed[0]["n_kept"],
                                  "recovered": recovered(summary, nothing, measures),
                                  "intervals": _intervals(measures, baseline, summary),
                                  **summary})
    return results


def _intervals(measures: Sequence[Measure], baseline: Mapping[str, Any],
               summary: Mapping[str, Any]) -> dict[str, list[float] | None]:
    """Per change, its paired interval over evaluation items (None without per-item values)."""
    return {m.change_name: intervals.paired_interval(m, baseline, summary["per_seed"])
            for m in measures}


def _kept_sets(name: str, kept_top: Selection, index: WeightIndex, scores, k: int,
               settings: ProtectSettings) -> dict[int, Selection]:
    """The set `name` of size k under each seed: random_k is drawn anew per seed (disjoint from
    the top-k of that size); the top-k, bottom_k and magnitude_k are the same for every seed."""
    if name == SUPER:
        return dict.fromkeys(settings.seeds, kept_top)

    def draw(seed: int) -> Selection:
        return control_set(name, kept_top, index, scores, k, settings.mode,
                           generator_for(seed, f"protect/{name}/k{k}"))

    if name == "random_k":
        return {seed: draw(seed) for seed in settings.seeds}
    return dict.fromkeys(settings.seeds, draw(settings.seeds[0]))


def recovered(kept: Mapping[str, Any], nothing: Mapping[str, Any],
              measures: Sequence[Measure]) -> dict[str, float | None]:
    """Per measure, the share of the damage of keeping nothing that keeping this set removes:
    1 - change(kept) / change(nothing kept); None where keeping nothing did no finite damage
    (nothing to recover, or a broken model to compare against)."""
    shares: dict[str, float | None] = {}
    for m in measures:
        none, this = analysis.damage(nothing[m.change_name]), analysis.damage(kept[m.change_name])
        defined = math.isfinite(none) and none > 0 and math.isfinite(this)
        shares[m.change_name] = 1.0 - this / none if defined else None
    return shares


def criteria_rows(results: Mapping[str, Any], measures: Sequence[Measure]) -> list[dict]:
    """"protection: top-k recovers more than <control>", on the primary measure at the largest
    size: the value is change(control kept) - change(top-k kept), PASS when above 0 and, where
    the evaluators give per-item values, when the paired interval over evaluation items of the
    control-kept model's change against the top-k-kept one lies above 0 too. A
    difference of damages stays defined when a model broke (a ratio would not); with no
    damage from keeping nothing there is nothing to recover and the row is a SKIP."""
    key = measures[0].change_name
    nothing = analysis.damage(results[NOTHING_KEPT][key])
    judged = [*JUDGED_CONTROLS, *(c for c in CONTROLS if c in results and
                                  c not in JUDGED_CONTROLS)]
    rows = []
    for name in judged:
        criterion = f"protection: top-k recovers more than {name}"
        if name not in results:
            rows.append(criteria.skipped(criterion, ">", 0, f"run with --controls {name}"))
        elif not nothing > 0:
            rows.append(criteria.skipped(
                criterion, ">", 0, f"{results['rule']['name']} with nothing kept did no damage "
                f"to {key} ({nothing:.4g}): nothing to recover"))
        else:
            top, control = results[SUPER][-1], results[name][-1]
            # the control-kept model against the top-k-kept one, on the same resampled items
            ci = intervals.paired_interval(measures[0], top["per_seed"][0], control["per_seed"])
            spared = analysis.damage(control[key]) - analysis.damage(top[key])
            note = _note(results, top, control, name, key)
            row = criteria.check(criterion, spared, ">", 0, note)
            if ci is None:
                row["note"] += ("; no interval over evaluation items (the evaluator returned no "
                                "per-item values): decided on the means")
            else:
                row["note"] += (f"; {key} of keeping {name} against keeping the top-k: 95% "
                                f"paired interval [{ci[0]:.4g}, {ci[1]:.4g}] over evaluation "
                                "items, which must lie above 0 too")
                if not ci[0] > 0:
                    row["verdict"] = criteria.FAIL
            rows.append(row)
    return rows


def _note(results: Mapping[str, Any], top: Mapping[str, Any], control: Mapping[str, Any],
          name: str, key: str) -> str:
    per = " per matrix" if results["mode"] == "per_layer" else " in total"
    shares = [f"{label} {_share(c['recovered'][key])}"
              for label, c in (("top-k", top), (name, control))]
    seeds = len(results["seeds"])
    return (f"value = {key}({name}) - {key}(top-k), k={top['k']}{per}; share of "
            f"{results['rule']['name']}'s {key} with nothing kept "
            f"({results[NOTHING_KEPT][key]:.4g}) recovered: {', '.join(shares)}; means over "
            f"{seeds} seed(s)")


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def export(kept: Selection, params: Mapping[str, Any], mode: str, k: int, path: Path) -> None:
    """protected_weights.safetensors: per parameter `<name>.indices` (int64 flat indices into
    the parameter, row-major over its whole shape, experts included) and `<name>.values`
    (their original values in the model's dtype), for a quantizer outside ESA to keep."""
    from safetensors.torch import save_file

    flat: dict[str, list[torch.Tensor]] = {}
    for picks in kept.picks:
        flat.setdefault(picks.matrix.param, []).append(picks.flat(params[picks.matrix.param].shape))
    tensors = {}
    for name, parts in flat.items():
        indices = torch.cat([p.to(torch.int64).cpu() for p in parts])
        weight = params[name].detach().reshape(-1)
        tensors[f"{name}.indices"] = indices
        tensors[f"{name}.values"] = weight[indices.to(weight.device)].cpu()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"mode": mode, "k": str(k),
                                               "weights": str(len(kept))})
