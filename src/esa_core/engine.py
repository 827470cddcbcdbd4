"""The scoring engine: one pass over calibration batches, scores streamed through hooks.

The engine owns forward, backward and hooks; a Metric only says what one batch adds to a score.
Gradients are consumed as they are accumulated and freed at once, so no model-sized gradient
buffer ever lives beside the accumulators, and parameters that are not scored get no gradient.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from esa_core import distributed, progress
from esa_core.api import ACTIVATIONS, GRAD, HVP, Metric, ModelAdapter, ScoredParam, Slot
from esa_core.errors import EsaError, PluginFailure
from esa_core.gradient_checkpointing import checkpointed
from esa_core.guards import plugin_call

log = logging.getLogger(__name__)


def batch_loss(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of a batch of token blocks."""
    logits = model(input_ids=input_ids, use_cache=False).logits
    return nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten()
    )


@contextlib.contextmanager
def only_scored_require_grad(model: nn.Module, scored: list[ScoredParam]) -> Iterator[None]:
    """Give gradients to the scored weights alone; restore requires_grad afterwards."""
    before = {p: p.requires_grad for p in model.parameters()}
    wanted = {id(s.param) for s in scored}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    try:
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)


def _call(metric: Metric, what: str, fn, *args):
    return plugin_call(f"metric '{metric.name}' failed in {what}", fn, *args)


def _view(tensor: torch.Tensor, expert: int | None) -> torch.Tensor:
    return tensor if expert is None else tensor[expert]


class ScoringRun:
    """Score every scored weight of `model` with `metric` over some calibration batches."""

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        scored: list[ScoredParam],
        metric: Metric,
        accum_dtype: torch.dtype = torch.float32,
        batch_size: int = 1,
        progress: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.scored = scored
        self.metric = metric
        self.accum_dtype = accum_dtype
        self.batch_size = batch_size
        self.progress = progress and distributed.is_main()
        self.gradient_checkpointing = gradient_checkpointing
        self.device = next(model.parameters()).device
        #: what `metric.keep` kept of each matrix in the last `score` call, on the host
        self.kept: dict[Slot, dict[str, torch.Tensor]] = {}
        self._grid = torch.empty(0, dtype=torch.int64)  # positions of the batch in flight

    def _states(self) -> dict[Slot, object]:
        return {
            (s.name, e): _call(self.metric, f"init_state({s.name})", self.metric.init_state,
                               _view(s.param.detach(), e), self.accum_dtype)
            for s in self.scored
            for e in s.experts
        }

    def score(self, blocks: torch.Tensor, seed: int, label: str = "") -> dict[str, torch.Tensor]:
        """Scores of every scored parameter (parameter-shaped, accum dtype) over `blocks`.

        Under torchrun each rank takes its share of the batches and the states are reduced
        across ranks before `finalize`, so every rank returns the single-process scores.
        """
        needs = self.metric.needs
        states = self._states()
        if self.device.type == "cuda":
            blocks = blocks.pin_memory()  # so each batch's copy below is truly asynchronous
        batches = list(blocks.split(self.batch_size)) if needs else []
        probe_generator = torch.Generator(device=self.device)
        with contextlib.ExitStack() as stack:
            if self.gradient_checkpointing and needs & {GRAD, HVP}:
                if ACTIVATIONS in needs:
                    raise EsaError(f"--gradient-checkpointing cannot serve metric "
                                   f"'{self.metric.name}': recomputing the blocks in the backward "
                                   "pass would show it every activation twice.")
                stack.enter_context(checkpointed(self.model))
            if ACTIVATIONS in needs:
                for s in self.scored:
                    stack.callback(self._tap_activations(s, states).remove)
            if GRAD in needs:
                stack.enter_context(only_scored_require_grad(self.model, self.scored))
                for s in self.scored:
                    stack.callback(self._tap_grad(s, states).remove)
            elif HVP in needs:
                stack.enter_context(only_scored_require_grad(self.model, self.scored))
                # torch's fused attention kernels have no double backward; the math one has
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            indices = distributed.shard(range(len(batches)))
            # each batch's loss is flagged on the device (no host sync per batch), read per seed
            finite = torch.ones(len(batches), dtype=torch.bool, device=self.device)
            if self.progress:
                indices = progress.track(indices, f"scoring {label}".strip(), "batches")
            for index in indices:
                batch = batches[index].to(self.device, non_blocking=True)
                if ACTIVATIONS in needs:
                    self._grid = torch.arange(batch.numel(), device=self.device) % batch.shape[1]
                if HVP in needs:
                    # probes depend on (seed, batch) alone: the same on any number of ranks
                    probe_generator.manual_seed(seed << 32 | index)
                    loss = self._hvp_step(batch, states, probe_generator)
                elif GRAD in needs:
                    loss = batch_loss(self.model, batch)
                    loss.backward()
                else:
                    with torch.no_grad():
                        self.model(input_ids=batch, use_cache=False)
                    continue
                finite[index] = torch.isfinite(loss.detach())
        bad = torch.nonzero(finite.logical_not()).flatten().tolist()
        if bad:
            more = f" (and {len(bad) - 1} later ones)" if len(bad) > 1 else ""
            raise EsaError(f"the loss became non-finite while scoring seed {seed}, at batch "
                           f"{bad[0] + 1} of {len(batches)}{more}, so every score would be "
                           "NaN: the model overflows on this text (in fp16, try --dtype bf16 "
                           "or fp32).")
        distributed.all_reduce(states, self.metric.state_reduce)
        return self._finalize(states, len(batches))

    def _tap_grad(self, s: ScoredParam, states: dict[Slot, object]):
        metric = self.metric

        def consume(param: torch.Tensor) -> None:
            grad, weight = param.grad, param.detach()
            for e in s.experts:
                _call(metric, f"on_grad({s.name})", metric.on_grad,
                      states[(s.name, e)], _view(weight, e), _view(grad, e))
            param.grad = None  # freed here: no gradient buffer survives the backward pass

        return s.param.register_post_accumulate_grad_hook(consume)

    def _tap_activations(self, s: ScoredParam, states: dict[Slot, object]):
        metric = self.metric
        weight = s.param.detach()

        def seen(inputs: torch.Tensor, outputs: torch.Tensor, expert: int | None,
                 tokens: torch.Tensor | None = None) -> None:
            _call(metric, f"on_activations({s.name})", metric.on_activations,
                  states[(s.name, expert)], _view(weight, expert), inputs.detach(),
                  outputs.detach(),
                  self._positions(s.name, len(inputs), tokens).to(inputs.device))

        return self.adapter.register_activation_hook(s, seen)

    def _positions(self, name: str, rows: int, tokens: torch.Tensor | None) -> torch.Tensor:
        """Each activation row's position within its calibration block (int64)."""
        if tokens is not None:
            return self._grid[tokens.to(self._grid.device)]
        if rows != len(self._grid):
            raise PluginFailure(
                f"adapter '{self.adapter.name}' showed {rows} activation rows of {name} for a "
                f"batch of {len(self._grid)} tokens without saying which tokens they are.")
        return self._grid

    def _hvp_step(self, batch: torch.Tensor, states, generator: torch.Generator
                  ) -> torch.Tensor:
        params = [s.param for s in self.scored]
        loss = batch_loss(self.model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for probe in range(self.metric.probes):
            zs = [
                torch.randint(0, 2, p.shape, generator=generator, device=p.device,
                              dtype=torch.int8).to(p.dtype).mul_(2).sub_(1)
                for p in params
            ]
            hzs = torch.autograd.grad(grads, params, grad_outputs=zs,
                                      retain_graph=probe < self.metric.probes - 1)
            for s, hz, z in zip(self.scored, hzs, zs):
                for e in s.experts:
                    _call(self.metric, f"on_hvp({s.name})", self.metric.on_hvp,
                          states[(s.name, e)], _view(s.param.detach(), e), _view(hz, e),
                          _view(z, e))
            del zs, hzs
        return loss.detach()  # the graph goes with `grads` and `loss` here

    def _finalize(self, states: dict[Slot, object], num_batches: int) -> dict[str, torch.Tensor]:
        scores: dict[str, torch.Tensor] = {}
        self.kept = {}
        for s in self.scored:
            weight = s.param.detach()
            parts = []
            for e in s.experts:
                state = states.pop((s.name, e))
                self.kept[(s.name, e)] = {
                    key: value.detach().to("cpu", copy=True) for key, value in
                    _call(self.metric, f"keep({s.name})", self.metric.keep, state,
                          _view(weight, e)).items()}
                part = _call(self.metric, f"finalize({s.name})", self.metric.finalize,
                             state, _view(weight, e), num_batches)
                if part.shape != _view(weight, e).shape:
                    raise PluginFailure(
                        f"metric '{self.metric.name}' returned scores of shape {tuple(part.shape)}"
                        f" for {s.name}, expected {tuple(_view(weight, e).shape)}."
                    )
                parts.append(part.to(self.accum_dtype))
            scores[s.name] = parts[0] if s.param.dim() == 2 else torch.stack(parts)
        return scores
