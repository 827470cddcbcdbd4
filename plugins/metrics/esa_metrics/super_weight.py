"""super_weight: score(i, j) = max|Y_i| · max|X_j| · |W_ij| on MLP down-projections.

Yu et al., "The Super Weight in Large Language Models" (2024): a handful of down-projection
weights join an input channel j that spikes to an output channel i that spikes (the "massive
activation"), and removing one of them destroys the model. Over every calibration token, the
metric keeps the largest |input| per input channel and the largest |output| per output channel,
so a weight joining a spiking input to a spiking output ranks first. One forward pass per batch.

Beside the scores it reproduces the paper's detection rule as a written result
(`super_weight_detection` in sensitivity_stats.json): per down-projection, the input channel
with the largest |input| and the output channel with the largest |output| over the calibration
tokens name the weight [output channel, input channel]; it is reported as a super weight when
both magnitudes exceed `threshold` (50 in the paper's code). The product score stays the ranking.

It scores mlp.down and moe.down unless --include names other components.
"""

from __future__ import annotations

import torch

from esa_core.api import ACTIVATIONS, Metric, Option

RULE = ("per down-projection: the weight [argmax_i max|Y_i|, argmax_j max|X_j|] over the "
        "calibration tokens is a super weight when both maxima exceed the threshold "
        "(Yu et al. 2024)")


class SuperWeight(Metric):
    """Activation spikes (Yu et al. 2024): max|Y_i| x max|X_j| x |W_ij| on down-projections."""

    name = "super_weight"
    needs = frozenset({ACTIVATIONS})
    components = ("mlp.down", "moe.down")
    state_reduce = "max"  # running maxima, also across ranks (token positions: rank-local)
    options = (Option("threshold", float, 50.0,
                      "detection: both |activations| must exceed this (the paper's 50)"),)

    def __init__(self, **values) -> None:
        super().__init__(**values)
        self._peaks: dict[int, list[torch.Tensor]] = {}  # data_ptr -> channel maxima, tokens

    def init_state(self, weight, dtype):
        rows, cols = weight.shape
        zeros = dict(dtype=dtype, device=weight.device)
        index = dict(dtype=torch.int64, device=weight.device)
        return (torch.zeros(cols, **zeros),  # max |X_j|
                torch.zeros(rows, **zeros),  # max |Y_i|
                torch.zeros(cols, **index),  # stream index of the token giving max |X_j|
                torch.zeros(rows, **index),  # ... of max |Y_i|
                torch.zeros((), **index))  # tokens seen

    def on_activations(self, state, weight, inputs, outputs):
        max_in, max_out, at_in, at_out, seen = state
        if len(inputs):  # an expert may receive no tokens in a batch
            for x, peak, at in ((inputs, max_in, at_in), (outputs, max_out, at_out)):
                value, token = x.abs().max(0)
                higher = value.to(peak.dtype) > peak
                at.copy_(torch.where(higher, token + seen, at))
                torch.maximum(peak, value.to(peak.dtype), out=peak)
            seen += len(inputs)

    def finalize(self, state, weight, num_batches):
        max_in, max_out, at_in, at_out, _ = state
        key = weight.data_ptr()
        if key in self._peaks:  # a later seed: keep the larger peak of each channel
            for old, new in ((self._peaks[key][0], (max_in, at_in)),
                             (self._peaks[key][1], (max_out, at_out))):
                higher = new[0] > old[0]
                old[0].copy_(torch.where(higher, new[0], old[0]))
                old[1].copy_(torch.where(higher, new[1], old[1]))
        else:
            self._peaks[key] = [[max_in.clone(), at_in.clone()], [max_out.clone(), at_out.clone()]]
        return max_out[:, None] * max_in[None, :] * weight.abs().to(max_in.dtype)

    def findings(self, matrices, seq_len):
        threshold = self.settings["threshold"]
        layers = []
        for key, ((max_in, at_in), (max_out, at_out)) in self._peaks.items():
            m = matrices[key]
            col, row = int(max_in.argmax()), int(max_out.argmax())
            found = {"param": m.param, "layer": m.layer, "component": m.component,
                     "expert": m.expert, "row": row, "col": col,
                     "output_max": float(max_out[row]), "output_token": int(at_out[row]) % seq_len,
                     "input_max": float(max_in[col]), "input_token": int(at_in[col]) % seq_len}
            found["passes"] = found["output_max"] > threshold and found["input_max"] > threshold
            layers.append(found)
        layers.sort(key=lambda d: (d["layer"] is None, d["layer"] or 0, d["expert"] or 0))
        return {"super_weight_detection": {"rule": RULE, "threshold": threshold,
                                           "token": "position within its calibration block",
                                           "layers": layers}}
