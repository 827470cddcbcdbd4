"""act_mag: score(W_ij) = |W_ij| · ‖X_j‖₂, the activation-weighted magnitude of Wanda.

Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (2023).
X_j is the j-th input feature of the matrix over every calibration token (for an MoE expert only
the tokens routed to it). One forward pass per batch, no backward; the state is one running sum of
squares per input feature, not a weight-sized buffer.
"""

from __future__ import annotations

import torch

from esa_core.api import ACTIVATIONS, Metric


class ActMag(Metric):
    """Wanda: |W_ij| x L2 norm of input feature j over all calibration tokens (forward only)."""

    name = "act_mag"
    needs = frozenset({ACTIVATIONS})

    def init_state(self, weight, dtype):
        return torch.zeros(weight.shape[1], dtype=dtype, device=weight.device)

    def on_activations(self, state, weight, inputs, outputs, positions):
        state.add_(inputs.to(state.dtype).square().sum(0))

    def finalize(self, state, weight, num_batches):
        return weight.abs().to(state.dtype) * state.sqrt()
