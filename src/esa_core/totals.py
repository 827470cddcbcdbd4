"""The sum of several seeds' scores, kept off the accelerator.

A model-sized score set on the accelerator is the largest thing ESA allocates besides the model,
so only the seed being scored has one there: the finished seeds' sum lives on the host (pinned
on CUDA, so copies are fast) and is folded in matrix by matrix, through one matrix-sized buffer
on the accelerator. N seeds therefore peak like one.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def running_total_device(scoring_device: torch.device) -> torch.device:
    """Where the finished seeds' sum lives while the next seed is scored on `scoring_device`."""
    return torch.device("cpu")


def to_host(value: torch.Tensor, host: torch.device) -> torch.Tensor:
    """`value` on `host`: itself when already there, else a copy (pinned when from CUDA)."""
    if value.device == host:
        return value
    out = torch.empty(value.shape, dtype=value.dtype, device=host,
                      pin_memory=value.device.type == "cuda" and host.type == "cpu")
    return out.copy_(value)


class RunningTotal:
    """The sum of the scores of `seeds`, per parameter, on `host`.

    Seeds are summed in order, so a sum restored from a checkpoint and continued equals the
    uninterrupted one bit for bit (float addition is commutative, so `add` and `finish` may put
    the new seed's scores on either side).
    """

    def __init__(self, sums: Mapping[str, torch.Tensor] | None = None,
                 seeds: list[int] | None = None, host: torch.device | None = None) -> None:
        self.host = host or torch.device("cpu")
        self.sums = {name: to_host(value, self.host) for name, value in (sums or {}).items()}
        self.seeds = list(seeds or [])

    def add(self, seed: int, scores: dict[str, torch.Tensor]) -> None:
        """Fold one seed's scores in, matrix by matrix; `scores` may be consumed."""
        for name in list(scores):
            value = scores.pop(name)
            total = self.sums.get(name)
            if total is None:
                self.sums[name] = to_host(value, self.host)
            elif total.device == value.device:
                total.add_(value)
            else:  # one matrix-sized buffer on the scoring device at a time
                total.copy_(total.to(value.device, non_blocking=True).add_(value))
            del value
        self.seeds.append(seed)

    def finish(self, seed: int, scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The sum including this last seed, built in `scores` where they live (the sum on the
        host is freed matrix by matrix as it is folded in)."""
        for name, value in scores.items():
            total = self.sums.pop(name, None)
            if total is not None:
                value.add_(total.to(value.device, non_blocking=True))
            del total
        self.seeds.append(seed)
        return scores
