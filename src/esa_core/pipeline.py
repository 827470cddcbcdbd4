"""The run, stage by stage: load, data, scoring, selection, outputs.

The core drives; plugins decide.
"""

from __future__ import annotations

import logging
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from esa_core import (
    __version__,
    criteria,
    data,
    distributed,
    layout,
    loading,
    perturbation,
    plots,
    report,
    stability,
)
from esa_core.api import Metric, ModelAdapter, Perturbation, ScoredParam
from esa_core.checkpoints import (
    Checkpoints,
    resumable_manifest,
    resume_record,
    selection_from,
    selection_tensors,
)
from esa_core.config import RunConfig
from esa_core.engine import ScoringRun
from esa_core.errors import EsaError
from esa_core.guards import out_of_memory_help
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
from esa_core.selection import Selection, check_topk, matrix_size, select
from esa_core.stats import sensitivity_stats

log = logging.getLogger(__name__)
GENERIC_ADAPTER = "generic"
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
    """Wall time per stage, and the last one completed (for an interrupted run's manifest)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self.completed: str | None = None
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        log.info("stage %s ...", name)
        with out_of_memory_help(name):
            yield
        self.timings[f"{name}_s"] = round(time.perf_counter() - start, 3)
        self.completed = name

    def total(self) -> float:
        return round(time.perf_counter() - self._start, 3)


def choose_adapter(registry: Registry, model_type: str, requested: str | None) -> ModelAdapter:
    """The adapter named by --adapter, else the one claiming `model_type`, else the generic one."""
    if requested:
        return registry.get("model adapter", requested)()
    for cls in registry.model_adapters.values():
        if model_type in getattr(cls, "model_types", ()):
            return cls()
    return registry.get("model adapter", GENERIC_ADAPTER)()


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
    """top_weights.csv rows: `param[row, col]` (or `param[expert, row, col]`) is `weight`."""
    rows = []
    for rank, (picks, i) in enumerate(selection.ranked(), start=1):
        m = picks.matrix
        row, col = int(picks.rows[i]), int(picks.cols[i])
        index = (row, col) if m.expert is None else (m.expert, row, col)
        rows.append({
            "rank": rank, "param": m.param, "layer": m.layer, "component": m.component,
            "expert": m.expert, "row": row, "col": col,
            "score": repr(float(picks.scores[i])),
            "weight": repr(float(params[m.param].detach()[index])),
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
    config.validate(registry)
    stages = Stages()
    started_at = now()
    source = loading.resolve(config.model)
    device = distributed.init(loading.pick_device(config.device))
    config.resolved(device.type)
    out_dir = prepare_out_dir(config.default_out_dir(source.model_id), config.overwrite,
                              config.resume)
    lock = FolderLock(out_dir)
    if out_dir.is_dir():
        lock.acquire()  # refuse at once, not after loading, if another process writes here
    previous = resumable_manifest(out_dir, config.to_dict()) if config.resume else None
    metric: Metric = registry.get("metric", config.metric)(**config.metric_args)
    rule: Perturbation | None = registry.get("perturbation", config.perturb)(
        **config.perturbation_options()) if config.perturb else None

    with stages.stage("load"):
        model_config = loading.load_config(source, config.trust_remote_code)
        adapter = choose_adapter(registry, model_config.model_type, config.adapter)
        dtype = loading.pick_dtype(config.dtype, device)
        model, tokenizer = adapter.load(source, dtype, device,
                                        trust_remote_code=config.trust_remote_code,
                                        device_map=config.device_map)
        include = config.include or metric.components or ()
        scored = adapter.scored_params(model, include, config.exclude)
        if not scored:
            raise EsaError(f"no weights to score in {source.model_id} with adapter "
                           f"'{adapter.name}' and the given --include/--exclude.")
        check_topk(config.topk, config.mode,
                   [matrix_size(m, s.param.shape) for s in scored for m in s.matrices])
    with stages.stage("data"):
        context = getattr(model.config, "max_position_embeddings", None)
        if context and config.seq_len > context:
            raise EsaError(f"--seq-len {config.seq_len} exceeds the model's context ({context}).")
        tokens = data.tokenize(data.read_texts(config.dataset), tokenizer, config.seq_len,
                               config.eval_samples)
        for seed in config.seeds:
            tokens.draw(seed, config.max_samples)  # checks the pool is big enough, up front
        if previous and previous.get("data", {}).get("sha256") != tokens.sha256:
            raise EsaError(f"--resume: the text of --dataset {config.dataset} changed since the "
                           "interrupted run; pass --overwrite to start over.")

    # Every check has passed: from here on the result folder is written.
    lock.acquire()
    checkpoints = Checkpoints(out_dir, config.to_dict())
    if previous:
        remove_leftovers(out_dir)
    else:
        checkpoints.clear()  # a fresh (or --overwrite) run never reuses another run's units
    manifest = _manifest(config, argv, source, model, model_config, adapter, scored, tokens,
                         device, dtype, registry, started_at)
    manifest["metric"] = {"name": metric.name, "options": metric.settings,
                          "components": sorted({m.component for s in scored for m in s.matrices})}
    if rule is not None:
        manifest["perturbation"] = {"name": rule.name, "options": rule.settings}
    if previous:
        manifest.update(resume_record(previous, started_at))
    write_json(out_dir / MANIFEST, {**manifest, "status": "running"})
    try:
        with stages.stage("scoring"), adapter.observe(model) as observed:
            mean_scores, seed_scores_top, seed_tops = _score_seeds(
                config, model, adapter, scored, metric, tokens, checkpoints)
        matrices = [m for s in scored for m in s.matrices]
        with stages.stage("selection"):
            selection = select(mean_scores, matrices, config.topk, config.mode)
            params = {s.name: s.param for s in scored}
            stats = {**sensitivity_stats(mean_scores, matrices, params, config.topk), **observed}
            write_csv(out_dir / layout.TOP_WEIGHTS, csv_rows(selection, params))
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
        manifest["success_criteria"] = criteria.phase2(summary, stats)
        if config.perturb:
            with stages.stage("evaluation"):
                study = perturbation.Study(
                    model=model, params=params, matrices=matrices, scores=mean_scores,
                    super_set=selection, eval_blocks=tokens.eval_blocks, perturbation=rule,
                    topk=config.topk, mode=config.mode, seeds=config.seeds,
                    batch_size=config.batch_size, progress=True, checkpoints=checkpoints)
                manifest["success_criteria"] += perturbation.run_stage(
                    study, config.controls, config.control_repeats, out_dir)
        with stages.stage("plots"):  # from the files just written, as `esa report` does
            # under torchrun only rank 0 wrote them; the other ranks have nothing to draw
            figures = plots.render(layout.RunFiles.read(out_dir)) if distributed.is_main() else None
            if config.save_plots and figures is not None:
                figures.save(out_dir / layout.PLOTS)
    except BaseException as exc:
        manifest.update(status="interrupted", last_completed_stage=stages.completed,
                        error=f"{type(exc).__name__}: {exc}", timings=stages.timings,
                        finished_at=now())
        write_json(out_dir / MANIFEST, manifest)
        lock.release()
        raise
    manifest.update(status="complete", last_completed_stage=stages.completed,
                    timings={**stages.timings, "total_s": stages.total()}, finished_at=now())
    write_json(out_dir / MANIFEST, manifest)
    if figures is not None:
        report.write(layout.RunFiles.read(out_dir), figures)  # the page shows the final timings
    checkpoints.clear()
    lock.release()
    return RunResult(out_dir, manifest, selection, stats, seed_scores_top)


def _score_seeds(config: RunConfig, model, adapter: ModelAdapter, scored: list[ScoredParam],
                 metric: Metric, tokens: data.TokenData, checkpoints: Checkpoints):
    """Score once per seed; return the seeds' mean scores, each seed's own top-k, and (for
    --stability-check) each scored seed's top-4k per unit, taken while its scores are alive.

    After each seed, its top-k and the running sum of scores are checkpointed (one model-sized
    file, not one per seed), so `--resume` continues with the next seed and sums in the same
    order: the result is bit-identical to an uninterrupted run's.
    """
    accum = {"fp32": torch.float32, "bf16": torch.bfloat16}[config.accum_dtype]
    scoring = ScoringRun(model, adapter, scored, metric, accum, config.batch_size,
                         gradient_checkpointing=config.gradient_checkpointing)
    matrices = [m for s in scored for m in s.matrices]
    total: dict[str, torch.Tensor] | None = None
    per_seed: dict[int, Selection] = {}
    devices = {s.name: s.param.device for s in scored}
    saved = checkpoints.load_tensors("scores")
    done = [int(seed) for seed in saved[1]["seeds"].split(",")] if saved else []
    tops = [checkpoints.load_tensors(f"seed_{seed}") for seed in done]
    if saved and done == config.seeds[:len(done)] and all(tops):
        total = {name: value.to(devices[name]) for name, value in saved[0].items()}
        per_seed = {seed: selection_from(top[0], matrices, devices)
                    for seed, top in zip(done, tops)}
        log.info("resuming after seeds %s", done)
    seed_tops: dict[int, stability.SeedTop] = {}
    offsets = stability.param_offsets(scored)
    for seed in config.seeds[len(per_seed):]:
        blocks = tokens.draw(seed, config.max_samples)
        scores = scoring.score(blocks, seed, label=f"seed {seed}")
        per_seed[seed] = select(scores, matrices, config.topk, config.mode)
        checkpoints.save_tensors(f"seed_{seed}", selection_tensors(per_seed[seed], matrices))
        if config.stability_check and len(config.seeds) > 1:
            seed_tops[seed] = stability.capture(scores, matrices, offsets, config.topk,
                                                config.mode)
        if total is None:
            total = scores
        else:
            for name, value in scores.items():
                total[name].add_(value)
            del scores
        checkpoints.save_tensors("scores", total, {"seeds": ",".join(map(str, per_seed))})
    assert total is not None
    for value in total.values():
        value.div_(len(config.seeds))
    return total, per_seed, seed_tops


def _manifest(config, argv, source, model, model_config, adapter, scored, tokens, device, dtype,
              registry: Registry, started_at: str) -> dict[str, Any]:
    used = {("metric", config.metric), ("model adapter", adapter.name)}
    if config.perturb:
        used.add(("perturbation", config.perturb))
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
