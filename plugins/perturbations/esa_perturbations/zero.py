"""zero: w <- 0, the ablation that first-order metrics such as grad_x_weight predict."""

from __future__ import annotations

import torch

from esa_core.api import Perturbation


class Zero(Perturbation):
    """w <- 0: remove the weight (no options)."""

    name = "zero"
    removes = True

    def perturb(self, values, matrix, generator):
        return torch.zeros_like(values), {}
