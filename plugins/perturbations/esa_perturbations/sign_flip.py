"""sign_flip: w <- -scale * w. With scale 1 the weight keeps its size and loses its direction."""

from __future__ import annotations

from esa_core.api import Perturbation


class SignFlip(Perturbation):
    """w <- -scale*w (--perturb-scale, default 1.0): same size, opposite sign."""

    name = "sign_flip"

    def perturb(self, values, matrix, generator, scale, prob):
        return values * -scale, {}
