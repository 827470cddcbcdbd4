"""sign_flip: w <- -scale * w. With scale 1 the weight keeps its size and loses its direction."""

from __future__ import annotations

from esa_core.api import Option, Perturbation


class SignFlip(Perturbation):
    """w <- -scale*w (--perturb-scale, default 1.0): same size, opposite sign."""

    name = "sign_flip"
    options = (Option("scale", float, 1.0, "w <- -scale*w (--perturb-scale)"),)

    def perturb(self, values, matrix, generator):
        return values * -self.settings["scale"], {}
