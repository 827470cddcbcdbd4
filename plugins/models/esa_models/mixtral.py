"""Mixtral (transformers 5): experts fused into 3-D tensors, scored expert by expert.

`mlp.experts.gate_up_proj` is [experts, 2*intermediate, hidden] ([gate; up] rows per expert),
`mlp.experts.down_proj` is [experts, hidden, intermediate] and `mlp.gate` is the router.
Checkpoints in the older per-expert layout (`block_sparse_moe.experts.N.w1/w2/w3`) are merged
into these tensors by transformers 5 when it loads them, so they land here too.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from esa_core.api import ActivationCallback, LogicalMatrix, ModelAdapter, ScoredParam
from esa_core.errors import EsaError
from esa_models.fused import consecutive, split_rows
from esa_models.llama import ATTENTION

GATE_UP = "fused.moe.gate_up"
EXPERTS = "mlp.experts"


def routing(experts: nn.Module, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts module's call arguments: hidden states [tokens, hidden], top-k expert ids."""
    bound = inspect.signature(experts.forward).bind(*args, **kwargs).arguments
    return bound["hidden_states"], bound["top_k_index"]


def routed_tokens(top_k_index: torch.Tensor,
                  num_experts: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(expert, token positions routed to it) for every expert that received a token."""
    for expert in range(num_experts):
        tokens = (top_k_index == expert).any(dim=-1).nonzero().squeeze(-1)
        if len(tokens):
            yield expert, tokens


def _check_layout(experts: nn.Module) -> None:
    if getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False) \
            or not hasattr(experts, "_apply_gate"):
        raise EsaError(f"the mixtral adapter does not know the expert layout of "
                       f"{type(experts).__name__} (transposed, biased or without _apply_gate).")


class MixtralAdapter(ModelAdapter):
    """Mixtral: attention like Llama; router, and each expert's gate, up and down matrices."""

    name = "mixtral"
    model_types = ("mixtral",)
    components = {
        **ATTENTION,
        "mlp.gate": "moe.router",
        f"{EXPERTS}.gate_up_proj": GATE_UP,
        f"{EXPERTS}.down_proj": "moe.down",
    }

    def matrices(self, name: str, param: nn.Parameter, component: str,
                 model: nn.Module) -> list[LogicalMatrix]:
        if component != GATE_UP:
            return super().matrices(name, param, component, model)
        # the experts' _apply_gate chunks the projection's output in two: gate first, then up
        half = param.shape[1] // 2
        parts = consecutive([("moe.gate", half), ("moe.up", half)])
        layer = self.layer_of(name)
        return [m for e in range(param.shape[0])
                for m in split_rows(name, param, layer, parts, expert=e)]

    def experts_modules(self, model: nn.Module) -> dict[int, nn.Module]:
        """Layer index -> the module holding that layer's fused expert tensors."""
        return {self.layer_of(f"{name}."): module for name, module in model.named_modules()
                if name.endswith(f".{EXPERTS}") and isinstance(
                    getattr(module, "gate_up_proj", None), nn.Parameter)}

    def register_activation_hook(self, scored: ScoredParam, callback: ActivationCallback):
        """Per expert, only its routed tokens: recomputed from the experts module's arguments.

        Whatever kernel transformers dispatches the experts to (eager loop, grouped_mm, ...),
        the module is called with the hidden states and the top-k expert ids, so each expert's
        inputs and outputs are rebuilt here from its own weights.
        """
        if scored.matrices[0].component == "moe.router":
            return scored.module.register_forward_hook(
                lambda module, args, output: callback(
                    args[0].reshape(-1, args[0].shape[-1]), output[0], None))  # router logits
        if scored.param.dim() != 3:
            return super().register_activation_hook(scored, callback)
        experts = scored.module
        _check_layout(experts)
        fused_gate_up = scored.param is experts.gate_up_proj

        def hook(module, args, kwargs, output):
            hidden, top_k_index = routing(module, args, kwargs)
            with torch.no_grad():
                for e, tokens in routed_tokens(top_k_index, module.num_experts):
                    x = hidden[tokens]
                    gate_up = F.linear(x, module.gate_up_proj[e])
                    if fused_gate_up:
                        callback(x, gate_up, e, tokens)
                    else:
                        h = module._apply_gate(gate_up)
                        callback(h, F.linear(h, module.down_proj[e]), e, tokens)

        return experts.register_forward_hook(hook, with_kwargs=True)

    @contextlib.contextmanager
    def observe(self, model: nn.Module) -> Iterator[dict[str, Any]]:
        """Router load: per layer, how many (token, expert) assignments each expert received."""
        modules = self.experts_modules(model)
        counts = {layer: torch.zeros(m.num_experts, dtype=torch.long)
                  for layer, m in modules.items()}
        observed: dict[str, Any] = {}

        def counter(layer: int):
            def hook(module, args, kwargs, output):
                top_k_index = routing(module, args, kwargs)[1]
                ids = top_k_index.flatten()
                ids = ids[ids < module.num_experts]  # expert-parallel padding ids
                counts[layer] += torch.bincount(ids, minlength=module.num_experts).cpu()
            return hook

        handles = [m.register_forward_hook(counter(layer), with_kwargs=True)
                   for layer, m in modules.items()]
        try:
            yield observed
        finally:
            for handle in handles:
                handle.remove()
            if counts:
                observed["router_load"] = {
                    "what": "token-to-expert assignments per layer during scoring, all seeds "
                            "(each token goes to top_k experts)",
                    "top_k": getattr(model.config, "num_experts_per_tok", None),
                    "per_layer": {f"layers.{layer}": c.tolist()
                                  for layer, c in sorted(counts.items())},
                }
