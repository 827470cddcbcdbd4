"""gauss_noise: w <- w + eps, eps ~ N(0, sigma^2), sigma = scale * std of the weight's own matrix.

Scaling by the matrix's own spread makes `--perturb-scale 0.02` mean "2 % of this matrix's
typical weight" in every layer, whatever the layer's initialisation or norm.
"""

from __future__ import annotations

import torch

from esa_core.api import Option, Perturbation


class GaussNoise(Perturbation):
    """w <- w + N(0, (scale * std of the weight's matrix)^2); --perturb-scale 0.02 = 2 % spread."""

    name = "gauss_noise"
    options = (Option("scale", float, 1.0, "sigma in stds of the weight's matrix "
                      "(--perturb-scale)"),)

    def perturb(self, values, matrix, generator):
        sigma = self.settings["scale"] * float(matrix.float().std(correction=0))
        noise = torch.randn(values.shape, generator=generator, dtype=torch.float32)
        new = values.float() + noise.to(values.device) * sigma
        return new.to(values.dtype), {}
