"""super_weight: score(i, j) = max|Y_i| · max|X_j| · |W_ij| on MLP down-projections.

Yu et al., "The Super Weight in Large Language Models" (2024): a handful of down-projection
weights join an input channel j that spikes to an output channel i that spikes (the "massive
activation"), and removing one of them destroys the model. Over every calibration token, the
metric keeps the largest |input| per input channel and the largest |output| per output channel,
so a weight joining a spiking input to a spiking output ranks first. One forward pass per batch.

It scores mlp.down and moe.down unless --include names other components.
"""

from __future__ import annotations

import torch

from esa_core.api import ACTIVATIONS, Metric


class SuperWeight(Metric):
    """Activation spikes (Yu et al. 2024): max|Y_i| x max|X_j| x |W_ij| on down-projections."""

    name = "super_weight"
    needs = frozenset({ACTIVATIONS})
    components = ("mlp.down", "moe.down")
    state_reduce = "max"  # running maxima, also across ranks

    def init_state(self, weight, dtype):
        rows, cols = weight.shape
        return (torch.zeros(cols, dtype=dtype, device=weight.device),  # max |X_j|
                torch.zeros(rows, dtype=dtype, device=weight.device))  # max |Y_i|

    def on_activations(self, state, weight, inputs, outputs):
        max_in, max_out = state
        if len(inputs):  # an expert may receive no tokens in a batch
            torch.maximum(max_in, inputs.abs().amax(0).to(max_in.dtype), out=max_in)
            torch.maximum(max_out, outputs.abs().amax(0).to(max_out.dtype), out=max_out)

    def finalize(self, state, weight, num_batches):
        max_in, max_out = state
        return max_out[:, None] * max_in[None, :] * weight.abs().to(max_in.dtype)
