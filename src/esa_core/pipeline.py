"""The run, stage by stage: load, data, scoring, selection, outputs.

The core drives; plugins decide.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from esa_core import (
    __version__,
    ablation,
    criteria,
    data,
    distributed,
    finish,
    hierarchy,
    layout,
    loading,
    perturbation,
    progress,
    protection,
    stability,
)
from esa_core.api import (
    EvalData,
    Evaluator,
    Kept,
    Metric,
    ModelAdapter,
    Perturbation,
    ScoredParam,
    Slot,
)
from esa_core.bench import Bench
from esa_core.config import Plugins, RunConfig
from esa_core.engine import ScoringRun
from esa_core.errors import EsaError
from esa_core.guards import out_of_memory_help, plugin_call
from esa_core.layout import MANIFEST
from esa_core.plugins import Registry
from esa_core.plugins import registry as default_registry
from esa_core.results import (
    FolderLock,
    prepare_out_dir,
    remove_leftovers,
    write_csv,
    write_json,
)
from esa_core.resume import (
    Checkpoints,
    check_disk_room,
    kept_from,
    kept_tensors,
    resumable_manifest,
    resume_record,
    selection_from,
    selection_tensors,
    tensor_bytes,
)
from esa_core.rewrite import check_room, original_bytes
from esa_core.selection import Selection, check_topk, matrix_size, param_offsets, select
from esa_core.stats import sensitivity_stats
from esa_core.totals import RunningTotal, running_total_device

log = logging.getLogger(__name__)
ACCUM_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # --accum-dtype
@dataclass
class RunResult:
    """What a finished run produced: its folder, manifest, selection and statistics."""

    out_dir: Path
    manifest: dict[str, Any]
    selection: Selection
    stats: dict[str, Any]
    seed_selections: dict[int, Selection] = field(default_factory=dict)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Stages:
    """Wall time per stage, and the last one completed (for an interrupted run's manifest).

    A failure is tagged with the stage it happened in (`esa_stage`), so the CLI can say where.
    Once `announce` is set (the run is under way, not refused), each finished stage is a
    progress line where no terminal shows a bar.
    """

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.completed: str | None = None
        self.announce = False
        #: set once the model's device is known: each stage then waits for its queued work
        self.device: torch.device | None = None
        self._start = time.perf_counter()

    def synchronize(self) -> None:
        """Wait for the device's queued work, so that asynchronous work is timed in the stage
        that queued it rather than spilling into the next one's time."""
        if self.device is not None and self.device.type != "cpu":
            getattr(torch, self.device.type).synchronize()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        log.info("stage %s ...", name)
        try:
            with out_of_memory_help(name):
                yield
        except BaseException as exc:
            if not hasattr(exc, "esa_stage"):
                exc.esa_stage = name
            raise
        self.synchronize()
        self.timings[f"{name}_s"] = round(time.perf_counter() - start, 3)
        self.completed = name
        if self.announce:
            progress.note(f"{name}: done, {self.timings[f'{name}_s']:.1f} s")

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "world_size": distributed.world_size(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def csv_rows(selection: Selection, params: dict[str, torch.nn.Parameter]) -> list[dict[str, Any]]:
    """top_weights.csv rows: `param[row, col]` (or `param[expert, row, col]`) is `weight`.

    Scores and weights are fetched one matrix at a time (a few hundred device reads, not one
    per row: 22,400 rows at an 8B model's per_layer top-100)."""
    values = {}
    for picks in selection.picks:
        m, weight = picks.matrix, params[picks.matrix.param].detach()
        at = (picks.rows, picks.cols) if m.expert is None else (m.expert, picks.rows, picks.cols)
        values[id(picks)] = (picks.rows.tolist(), picks.cols.tolist(), picks.scores.tolist(),
                             weight[at].tolist())
    rows = []
    for rank, (picks, i) in enumerate(selection.ranked(), start=1):
        m = picks.matrix
        row, col, score, weight = (column[i] for column in values[id(picks)])
        rows.append({
            "rank": rank, "param": m.param, "layer": m.layer, "component": m.component,
            "expert": m.expert, "row": row, "col": col, "score": repr(score),
            "weight": repr(weight),
        })
    return rows


def run(config: RunConfig | None = None, *, argv: list[str] | None = None,
        registry: Registry | None = None, **settings: Any) -> RunResult:
    """Run one analysis end to end and write its result folder.

    The Python API mirrors the CLI: `esa_core.run(metric="grad_x_weight", topk=50,
    seeds=[1337, 123], out_dir="outputs/x")` takes RunConfig's fields as keywords.
    """
    registry = registry or default_registry()
    config = config or RunConfig(**settings)
    plugins = config.build(registry)
    stages = Stages()
    started_at = now()
    source = loading.resolve(config.model)
    device = distributed.init(loading.pick_device(config.device))
    stages.device = device
    config.resolved(device.type)
    out_dir = prepare_out_dir(config.default_out_dir(source.model_id), config.overwrite,
                              config.resume)
    lock = FolderLock(out_dir)
    if out_dir.is_dir():
        lock.acquire()  # refuse at once, not after loading, if another process writes here
    previous = resumable_manifest(out_dir, config.to_dict()) if config.resume else None
    if finish.only_finishing_left(previous):
        return _finish_only(out_dir, previous, config, argv, stages, lock, started_at)
    metric: Metric = plugins.metric
    rules: list[Perturbation] = plugins.perturbations
    protect_rule: Perturbation | None = plugins.protector

    with stages.stage("load"):
        model_config = loading.load_config(source, config.trust_remote_code)
        adapter: ModelAdapter = registry.adapter_for(model_config.model_type, config.adapter)()
        context = getattr(model_config, "max_position_embeddings", None)
        if context and config.seq_len > context:
            raise EsaError(f"--seq-len {config.seq_len} exceeds the model's context ({context}).")
        include = config.include or metric.components or ()
        empty = loading.empty_model(model_config, config.trust_remote_code)
        if empty is not None:  # every check that needs only the shapes, before the weights load
            _check_scored(config, source, adapter,
                          adapter.scored_params(empty, include, config.exclude), out_dir)
        dtype = loading.pick_dtype(config.dtype, device)
        model, tokenizer = adapter.load(source, dtype, device,
                                        trust_remote_code=config.trust_remote_code,
                                        device_map=config.device_map)
        loading.refuse_nonfinite(model, source.model_id)
        scored = adapter.scored_params(model, include, config.exclude)
        _check_scored(config, source, adapter, scored)
        if protect_rule:  # the originals go to disk while the model is changed
            check_room(out_dir, original_bytes([m for s in scored for m in s.matrices],
                                               {s.name: s.param for s in scored}))
    with stages.stage("data"):
        tokens = data.tokenize(data.read_texts(config.dataset), tokenizer, config.seq_len,
                               config.eval_samples)
        for seed in config.seeds:
            tokens.draw(seed, config.max_samples)  # checks the pool is big enough, up front
        if previous and previous.get("data", {}).get("sha256") != tokens.sha256:
            raise EsaError(f"--resume: the text of --dataset {config.dataset} changed since the "
                           "interrupted run; pass --overwrite to start over.")

    # Every check has passed: from here on the result folder is written.
    stages.announce = True
    lock.acquire()
    checkpoints = Checkpoints(out_dir, config.to_dict(), config.checkpoint)
    if previous:
        remove_leftovers(out_dir)
    else:
        checkpoints.clear()  # a fresh (or --overwrite) run never reuses another run's units
    manifest = _manifest(config, argv, source, model, model_config, adapter, scored, tokens,
                         device, dtype, registry, plugins, started_at)
    manifest["metric"] = {"name": metric.name, "options": metric.settings,
                          "components": sorted({m.component for s in scored for m in s.matrices})}
    if rules:
        described = [{"name": rule.name, "options": rule.settings} for rule in rules]
        manifest["perturbation"] = described[0] if len(described) == 1 else described
    if previous:
        manifest.update(resume_record(previous, started_at))
    write_json(out_dir / MANIFEST, {**manifest, "status": "running"})
    with _recorded(out_dir, manifest, stages, checkpoints, lock):
        with stages.stage("scoring"), adapter.observe(model) as observed:
            mean_scores, seed_scores_top, seed_tops, kept = _score_seeds(
                config, model, adapter, scored, metric, tokens, checkpoints)
        matrices = [m for s in scored for m in s.matrices]
        with stages.stage("selection"):
            selection = select(mean_scores, matrices, config.topk, config.mode)
            params = {s.name: s.param for s in scored}
            stats = {**sensitivity_stats(mean_scores, matrices, params, config.topk), **observed}
            tables = plugin_call(f"metric '{metric.name}' failed in findings",
                                 metric.findings, kept)
            if tables:
                stats["findings"] = {t.name: t.stored(metric.name) for t in tables}
            top_rows = csv_rows(selection, params)
            stats["hierarchy"] = hierarchy.judge(hierarchy.densities(mean_scores, matrices))
            write_csv(out_dir / layout.TOP_WEIGHTS, top_rows)
            write_json(out_dir / layout.SENSITIVITY_STATS, stats)
        summary = None
        if config.stability_check:
            with stages.stage("stability"):
                summary = stability.write_summary(out_dir, seed_tops, config.seeds,
                                                  config.topk, config.mode,
                                                  data_free=not metric.needs)
            manifest["stability"] = summary if "skipped" in summary else {
                "file": layout.STABILITY_SUMMARY,
                **{k: summary[k] for k in ("jaccard_mean", "jaccard_std", "num_seeds")}}
        manifest["success_criteria"] = [*criteria.phase2(summary, stats),
                                        hierarchy.row(stats["hierarchy"])]
        if config.perturb or config.ablate_top or protect_rule:
            eval_data = EvalData(tokens.eval_blocks, tokenizer, config.batch_size)
            bench = Bench(model, params, prepared(plugins.evaluators, model, eval_data),
                          eval_data, checkpoints)
        if config.perturb:
            with stages.stage("evaluation"):
                manifest["success_criteria"] += perturbation.run_stage(
                    bench, matrices, mean_scores, selection, rules,
                    perturbation.StudySettings(config.topk, config.mode, config.seeds,
                                               config.controls, config.control_repeats),
                    out_dir)
        if config.ablate_top:
            with stages.stage("ablation"):
                manifest["ablation"] = ablation.run(
                    bench.on_blocks(ablation.ablation_blocks(eval_data.blocks,
                                                             config.ablate_eval_samples)),
                    plugins.remover, selection, top_rows,
                    config.ablate_top, config.critical_ratio, out_dir)
        if protect_rule:
            with stages.stage("protection"):
                rows, manifest["protection"] = protection.run_stage(
                    bench, matrices, mean_scores, selection, protect_rule,
                    protection.ProtectSettings(config.protect_k, config.mode, config.seeds,
                                               config.controls),
                    checkpoints.folder / protection.ORIGINALS, out_dir)
                manifest["success_criteria"] += rows
        _write_outputs(out_dir, manifest, config, stages)
    return RunResult(out_dir, manifest, selection, stats, seed_scores_top)


def _write_outputs(out_dir: Path, manifest: dict[str, Any], config: RunConfig,
                   stages: Stages) -> None:
    finish.write_outputs(out_dir, manifest, config.save_plots, stages.stage, lambda: {
        "status": "complete", "last_completed_stage": stages.completed,
        "timings": {**manifest.get("timings", {}), **stages.timings, "total_s": stages.total()},
        "finished_at": now()})


def _finish_only(out_dir: Path, previous: dict[str, Any], config: RunConfig, argv, stages: Stages,
                 lock: FolderLock, started_at: str) -> RunResult:
    """--resume of a run that failed while drawing or writing its report: every result file is
    in place, so only the figures, the report and the manifest are written."""
    stages.announce = True
    checkpoints = Checkpoints(out_dir, config.to_dict(), config.checkpoint)
    manifest = {k: v for k, v in previous.items() if k not in finish.FAILURE_KEYS}
    if argv is not None:
        manifest["argv"] = list(argv)
    manifest.update(resume_record(previous, started_at))
    with _recorded(out_dir, manifest, stages, checkpoints, lock):
        remove_leftovers(out_dir)
        _write_outputs(out_dir, manifest, config, stages)
    files = layout.RunFiles.read(out_dir)
    return RunResult(out_dir, manifest, finish.selection_of(files.top), files.stats or {})


@contextmanager
def _recorded(out_dir: Path, manifest: dict[str, Any], stages: Stages, checkpoints: Checkpoints,
              lock: FolderLock) -> Iterator[None]:
    """The writing part of a run: if it stops, the manifest says `interrupted`, in which stage
    and why; if it completes, the checkpoints are removed. The folder's lock is let go."""
    try:
        yield
    except BaseException as exc:
        exc.esa_out_dir = out_dir  # where the CLI puts error.log
        manifest.update(status="interrupted", last_completed_stage=stages.completed,
                        failed_stage=getattr(exc, "esa_stage", None),
                        error=f"{type(exc).__name__}: {exc}",
                        timings={**manifest.get("timings", {}), **stages.timings},
                        finished_at=now())
        # a full disk may refuse this write too: the user needs the first error, not this one
        with suppress(Exception):
            write_json(out_dir / MANIFEST, manifest)
        checkpoints.settle()
        lock.release()
        _note_checkpoint_size(exc, checkpoints)
        raise
    checkpoints.clear()
    lock.release()


def _note_checkpoint_size(exc: BaseException, checkpoints: Checkpoints) -> None:
    """A stopped run's last word (the CLI ends its one line with it): how much disk its
    checkpoints hold, and how to free it."""
    note = checkpoints.size_note() if distributed.is_main() else None
    if note:
        exc.add_note(note)


def _check_scored(config: RunConfig, source: loading.ModelSource, adapter: ModelAdapter,
                  scored: list[ScoredParam], out_dir: Path | None = None) -> None:
    """Something to score, a top-k the matrices can supply, and (given `out_dir`) room on the
    disk for the result files and the score sum that --checkpoint would save."""
    if not scored:
        raise EsaError(f"no weights to score in {source.model_id} with adapter "
                       f"'{adapter.name}' and the given --include/--exclude.")
    sizes = [matrix_size(m, s.param.shape) for s in scored for m in s.matrices]
    check_topk(config.topk, config.mode, sizes)
    if out_dir is not None and distributed.is_main():
        rows = config.topk * (len(sizes) if config.mode == "per_layer" else 1)
        accum = torch.finfo(ACCUM_DTYPES[config.accum_dtype]).bits // 8
        check_disk_room(out_dir, config.checkpoint, sum(s.param.numel() for s in scored) * accum,
                        rows + config.ablate_top)


def prepared(evaluators: list[Evaluator], model: torch.nn.Module,
             data: EvalData) -> list[Evaluator]:
    """The --evaluator plugins (built and checked before the model loaded), each prepared once."""
    for evaluator in evaluators:
        plugin_call(f"evaluator '{evaluator.name}' failed to prepare", evaluator.prepare,
                    model, data)
    return evaluators


def _score_seeds(config: RunConfig, model, adapter: ModelAdapter, scored: list[ScoredParam],
                 metric: Metric, tokens: data.TokenData, checkpoints: Checkpoints):
    """Score once per seed; return the seeds' mean scores, each seed's own top-k, (for
    --stability-check) each scored seed's top-4k per unit, taken while its scores are alive,
    and what the metric kept of every matrix (`Metric.keep`) for every seed.

    Only the seed being scored has scores on the accelerator; the finished seeds' sum waits on
    the host (`RunningTotal`). After each seed its top-k is checkpointed, and the running sum too
    when `checkpoints` finds it worth writing (it is written in the background while the next
    seed scores), so `--resume` continues with the next seed and sums in the same order: the
    result is bit-identical to an uninterrupted run's. A seed's unit holds its top-k and what
    the metric kept of it.
    """
    accum = ACCUM_DTYPES[config.accum_dtype]
    scoring = ScoringRun(model, adapter, scored, metric, accum, config.batch_size,
                         gradient_checkpointing=config.gradient_checkpointing)
    matrices = [m for s in scored for m in s.matrices]
    slots = [slot for s in scored for slot in s.slots]
    devices = {s.name: s.param.device for s in scored}
    total, per_seed, kept = _restored(checkpoints, config.seeds, matrices, slots, devices,
                                      running_total_device(scoring.device))
    seed_tops: dict[int, stability.SeedTop] = {}
    offsets = param_offsets({s.name: s.param for s in scored})
    remaining = config.seeds[len(per_seed):]
    sums: dict[str, torch.Tensor] = {}
    if not remaining:  # every seed was restored: the mean is made where the scores belong
        sums = {name: total.sums.pop(name).to(devices[name]) for name in list(total.sums)}
    unsaved_s = 0.0  # scoring time a stop would lose: since the sum was last saved
    for i, seed in enumerate(remaining):
        start = time.perf_counter()
        blocks = tokens.draw(seed, config.max_samples)
        scores = scoring.score(blocks, seed, label=f"seed {seed}")
        per_seed[seed] = select(scores, matrices, config.topk, config.mode)
        kept[seed] = scoring.kept
        checkpoints.save_tensors(f"seed_{seed}", {
            **selection_tensors(per_seed[seed], matrices), **kept_tensors(kept[seed], slots)})
        if config.stability_check and len(config.seeds) > 1:
            seed_tops[seed] = stability.capture(scores, matrices, offsets, config.topk,
                                                config.mode)
        unsaved_s += time.perf_counter() - start
        checkpoints.wait()  # the previous sum's background write must not see this fold
        last = i == len(remaining) - 1
        if last:
            sums = total.finish(seed, scores)
        else:
            total.add(seed, scores)
            sums = total.sums
        if checkpoints.worth_writing(tensor_bytes(sums), unsaved_s):
            # the last sum is divided in place next, so it is written before that
            checkpoints.save_tensors("scores", sums, {"seeds": ",".join(map(str, total.seeds))},
                                     background=not last)
            unsaved_s = 0.0
    for value in sums.values():
        value.div_(len(config.seeds))
    return sums, per_seed, seed_tops, kept_by_matrix(scored,
                                                     [kept[seed] for seed in config.seeds])


def kept_by_matrix(scored: list[ScoredParam], seeds: list[dict[Slot, dict[str, torch.Tensor]]]
                   ) -> list[Kept]:
    """What the metric kept (`ScoringRun.kept` of each seed, in order), matrix by matrix."""
    return [Kept(name, e, [m for m in s.matrices if m.expert == e],
                 [seed[name, e] for seed in seeds]) for s in scored for name, e in s.slots]


def _restored(checkpoints: Checkpoints, seeds: list[int], matrices, slots, devices,
              host: torch.device) -> tuple[RunningTotal, dict[int, Selection], dict[int, Any]]:
    """The sum, the per-seed top-k and what the metric kept of the seeds an interrupted run
    finished (none if fresh)."""
    saved = checkpoints.load_tensors("scores")
    done = [int(seed) for seed in saved[1]["seeds"].split(",")] if saved else []
    units = [checkpoints.load_tensors(f"seed_{seed}") for seed in done]
    if not (saved and done == seeds[:len(done)] and all(units)):
        return RunningTotal(host=host), {}, {}
    log.info("resuming after seeds %s", done)
    return (RunningTotal(saved[0], done, host),
            {seed: selection_from(unit[0], matrices, devices) for seed, unit in zip(done, units)},
            {seed: kept_from(unit[0], slots) for seed, unit in zip(done, units)})


def _manifest(config, argv, source, model, model_config, adapter, scored, tokens, device, dtype,
              registry: Registry, plugins: Plugins, started_at: str) -> dict[str, Any]:
    used = {("metric", config.metric), ("model adapter", adapter.name)}
    used |= {("perturbation", rule.name) for rule in plugins.perturbations}
    if plugins.remover is not None:
        used.add(("perturbation", plugins.remover.name))
    if plugins.protector is not None:
        used.add(("perturbation", plugins.protector.name))
    if config.perturb or config.ablate_top or config.protect:
        used |= {("evaluator", e.name) for e in plugins.evaluators}
    plugins = [
        {"kind": e.kind, "name": e.name, "distribution": e.distribution, "version": e.version}
        for e in registry.entries if (e.kind, e.name) in used
    ]
    return {
        "esa_version": __version__,
        "argv": list(argv) if argv is not None else sys.argv,
        "config": config.to_dict(),
        "model": {
            "id": source.model_id,
            "source": source.kind,
            "model_type": model_config.model_type,
            "n_params": sum(p.numel() for p in model.parameters()),
            "n_scored": sum(s.param.numel() for s in scored),
            "n_matrices": sum(len(s.matrices) for s in scored),
            "dtype": str(dtype).removeprefix("torch."),
            "adapter": adapter.name,
        },
        "data": {**tokens.manifest(), "n_calibration": config.max_samples},
        "seeds": {str(seed): {"calibration_blocks": idx} for seed, idx in tokens.draws.items()},
        "environment": environment(device),
        "plugins": plugins,
        "started_at": started_at,
    }
