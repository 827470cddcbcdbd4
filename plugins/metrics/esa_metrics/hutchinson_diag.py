"""hutchinson_diag: the Hessian diagonal by Hutchinson's estimator, diag H ≈ mean of z ⊙ Hz.

z are Rademacher probes (±1), Hz Hessian-vector products of the batch loss by double backward,
`probes` of them per calibration batch; E[z ⊙ Hz] = diag H exactly, with a variance that falls
as 1/(probes x batches). The mean over all probes and batches estimates the diagonal of the mean
batch Hessian.

score=saliency (default): ½·|diag H|·w², the second-order (Optimal Brain Damage) estimate of the
loss change of removing the weight. score=raw: |diag H|, the curvature alone.
"""

from __future__ import annotations

from esa_core.api import HVP, Metric, Option
from esa_core.errors import EsaError


class HutchinsonDiag(Metric):
    """Hessian diagonal (Hutchinson, Rademacher probes); default score 1/2 |diag H| w^2."""

    name = "hutchinson_diag"
    needs = frozenset({HVP})
    options = (
        Option("probes", int, 1, "Rademacher probes per calibration batch (>= 1)"),
        Option("score", str, "saliency", "saliency = 1/2 |diag H| w^2, raw = |diag H|",
               choices=("saliency", "raw")),
    )

    def __init__(self, **values):
        super().__init__(**values)
        self.probes = self.settings["probes"]
        if self.probes < 1:
            raise EsaError(f"{self.name} option 'probes' must be at least 1; got {self.probes}.")

    def on_hvp(self, state, weight, hz, z):
        state.add_((hz * z).to(state.dtype))

    def finalize(self, state, weight, num_batches):
        diag = (state / max(num_batches * self.probes, 1)).abs_()
        if self.settings["score"] == "raw":
            return diag
        return diag.mul_(weight.to(diag.dtype).square()).mul_(0.5)
