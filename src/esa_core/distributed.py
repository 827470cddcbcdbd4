"""Running under `torchrun`: one process per rank, work sharded, results reduced, rank 0 writes.

Everything ESA knows about torch.distributed lives here. Outside torchrun (no WORLD_SIZE, or
WORLD_SIZE=1) every function is the single-process identity, so the rest of ESA calls them
unconditionally. Under `torchrun --nproc-per-node N --no-python esa run ...` each rank loads the
model, takes every N-th calibration batch (`shard`), and the metric states are summed across
ranks (`all_reduce`) before the scores are finalised, so every rank ends with the scores a single
process would compute (to float summation order); only rank 0 (`is_main`) writes result files.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from esa_core.api import RunningMax
from esa_core.errors import EsaError

T = TypeVar("T")
REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def world_size() -> int:
    """Number of ranks; 1 outside torchrun."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank; 0 outside torchrun."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the one process that writes results and prints (rank 0)."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun describes in the environment; the device for this rank.

    Returns `device` unchanged outside torchrun. On CUDA every rank takes its own GPU
    (cuda:LOCAL_RANK) and the backend is NCCL; on the CPU it is gloo. Idempotent.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_leave)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item, starting at its rank.

    Round-robin keeps the shares within one item of each other, and the union over ranks is
    exactly `items`, so per-item contributions summed across ranks equal a single process's sum.
    """
    return list(items[rank()::world_size()])


def all_reduce(states: dict[Any, Any], op: str = "sum") -> None:
    """Reduce, in place and across ranks, every tensor inside `states` (values may be tensors,
    `RunningMax`es, or tuples, lists and dicts of them, e.g. a metric's state). `op`: sum, max
    or min for tensors; a RunningMax keeps each channel's largest value with its own position.

    One collective per tensor, so no model-sized staging buffer is built. No-op on one rank.
    """
    if op not in REDUCE_OPS:
        raise EsaError(f"unknown cross-rank reduction '{op}'. Valid choices: "
                       f"{', '.join(REDUCE_OPS)}.")
    if world_size() == 1:
        return
    for part in _parts(list(states.values())):
        if isinstance(part, RunningMax):
            _gather_peaks(part)
        else:
            dist.all_reduce(part, op=REDUCE_OPS[op])


def _gather_peaks(peaks: RunningMax) -> None:
    """The largest value of each channel over the ranks, and the position of that value (the
    lowest rank's where ranks tie)."""
    mine = peaks.values.clone()
    dist.all_reduce(peaks.values, op=dist.ReduceOp.MAX)
    held = mine == peaks.values
    order = torch.where(held, rank(), world_size()).to(torch.int64)
    dist.all_reduce(order, op=dist.ReduceOp.MIN)
    peaks.at.masked_fill_(order != rank(), 0)
    dist.all_reduce(peaks.at, op=dist.ReduceOp.SUM)


def _parts(value: Any) -> list[torch.Tensor | RunningMax]:
    if isinstance(value, (torch.Tensor, RunningMax)):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _parts(item)]
    raise EsaError(f"cannot reduce a {type(value).__name__} across ranks: a metric state must "
                   "be a tensor, a RunningMax, or a tuple, list or dict of them.")
