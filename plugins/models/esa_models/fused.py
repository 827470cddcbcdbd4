"""Splitting fused tensors (one parameter holding several logical matrices) by their rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from esa_core.api import LogicalMatrix
from esa_core.errors import EsaError


def split_rows(name: str, param: nn.Parameter, layer: int | None,
               parts: Sequence[tuple[str, torch.Tensor]],
               expert: int | None = None) -> list[LogicalMatrix]:
    """One LogicalMatrix per (component, real rows) part; the parts must cover every row once."""
    rows = param.shape[-2]
    covered = torch.cat([r for _, r in parts]).sort().values
    if not torch.equal(covered, torch.arange(rows)):
        sizes = ", ".join(f"{c}: {len(r)}" for c, r in parts)
        raise EsaError(f"{name} has {rows} rows, which the config's sizes ({sizes}) "
                       "do not split exactly: is --adapter right for this model?")
    return [LogicalMatrix(name, layer, component, expert, r) for component, r in parts]


def consecutive(sizes: Sequence[tuple[str, int]]) -> list[tuple[str, torch.Tensor]]:
    """Parts laid out one after another: [first's rows, second's rows, ...]."""
    parts, start = [], 0
    for component, size in sizes:
        parts.append((component, torch.arange(start, start + size)))
        start += size
    return parts


def head_dim(config) -> int:
    """Per-head width: the config's own head_dim when it has one, else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
