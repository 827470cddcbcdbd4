"""Gradient checkpointing that works on a model in eval mode (`--gradient-checkpointing`).

transformers' own switch (`gradient_checkpointing_enable`) only checkpoints while the model is
in training mode, and ESA scores in eval mode (dropout off). So ESA wraps the forward of every
outermost transformer block itself with `torch.utils.checkpoint` (non-reentrant): a block keeps
only its inputs during the forward and recomputes its activations during the backward. Scores
are unchanged; activation memory falls from every block's to one block's, at the cost of a
second forward of each block.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn
from torch.utils.checkpoint import checkpoint

from esa_core.errors import EsaError


def blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost modules transformers marks as checkpointable (its decoder layers)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer, _ in found)
        if isinstance(module, GradientCheckpointingLayer) and not inside:
            found.append((name, module))
    return [module for _, module in found]


@contextlib.contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Recompute every transformer block's activations in the backward pass, for this block."""
    layers = blocks(model)
    if not layers:
        raise EsaError(f"--gradient-checkpointing: {type(model).__name__} has no transformer "
                       "blocks that transformers marks as checkpointable.")
    for layer in layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute; the class's forward shows through again
