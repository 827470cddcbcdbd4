"""grad_squared: score(w) = mean over batches of (dL/dw)², the empirical Fisher diagonal.

L is the mean next-token cross-entropy of one batch, and a batch is `--batch-size` token blocks
(sequences), so g is the gradient of a mean over batch_size x seq_len tokens. The square of a mean
is not the mean of the squares: with batches of several sequences this underestimates the
per-sample Fisher (the per-sequence gradients' variance averages out before squaring). Use
`--batch-size 1` for the per-sequence estimate.
"""

from __future__ import annotations

from esa_core.api import GRAD, Metric


class GradSquared(Metric):
    """Squared gradient, mean over batches: the empirical Fisher diagonal (batch = --batch-size)."""

    name = "grad_squared"
    needs = frozenset({GRAD})

    def on_grad(self, state, weight, grad):
        state.add_(grad.to(state.dtype).square_())
