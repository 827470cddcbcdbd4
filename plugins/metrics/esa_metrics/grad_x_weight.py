"""grad_x_weight: score(w) = mean over calibration batches of |dL/dw * w|.

L is the batch's mean next-token cross-entropy. |g*w| is the first-order Taylor estimate of how
much the loss changes if the weight is removed (set to zero).
"""

from __future__ import annotations

from esa_core.api import GRAD, Metric


class GradXWeight(Metric):
    """|gradient x weight|, mean over batches: first-order loss change of removing the weight."""

    name = "grad_x_weight"
    needs = frozenset({GRAD})

    def on_grad(self, state, weight, grad):
        state.add_((grad * weight).abs_().to(state.dtype))
