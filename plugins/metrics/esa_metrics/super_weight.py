"""super_weight: score(i, j) = max|Y_i| · max|X_j| · |W_ij| on MLP down-projections.

Yu et al., "The Super Weight in Large Language Models" (2024): a handful of down-projection
weights join an input channel j that spikes to an output channel i that spikes (the "massive
activation"), and removing one of them destroys the model. Over every calibration token, the
metric keeps the largest |input| per input channel and the largest |output| per output channel,
so a weight joining a spiking input to a spiking output ranks first. One forward pass per batch.

Beside the scores it reproduces the paper's detection rule as a findings table
(`findings.super_weight_detection` in sensitivity_stats.json): per down-projection, the input
channel with the largest |input| and the output channel with the largest |output| over the
calibration tokens of every seed name the weight [output channel, input channel]; it is reported
as a super weight when both magnitudes exceed `threshold` (50 in the paper's code), with the
position in its calibration block of the token that gave each. The product score stays the
ranking. Each seed's channel peaks are kept by the engine (`keep`), not by the metric.

It scores mlp.down and moe.down unless --include names other components.
"""

from __future__ import annotations

from esa_core.api import ACTIVATIONS, Column, Findings, Kept, Metric, Option, RunningMax

RULE = ("per down-projection: the weight [argmax_i max|Y_i|, argmax_j max|X_j|] over the "
        "calibration tokens of every seed is a super weight when both maxima exceed the "
        "threshold (Yu et al. 2024)")
COLUMNS = (
    Column("param", "the parameter; the weight is param[row, col] (param[expert, row, col])"),
    Column("layer"), Column("component"), Column("expert"),
    Column("row", "output channel with the largest |output|"),
    Column("col", "input channel with the largest |input|"),
    Column("output_max", "max |Y_row| over the calibration tokens"),
    Column("output_token", "position within its calibration block of the token giving it"),
    Column("input_max", "max |X_col| over the calibration tokens"),
    Column("input_token", "position within its calibration block of the token giving it"),
    Column("passes", "both maxima exceed the threshold"),
)


class SuperWeight(Metric):
    """Activation spikes (Yu et al. 2024): max|Y_i| x max|X_j| x |W_ij| on down-projections."""

    name = "super_weight"
    needs = frozenset({ACTIVATIONS})
    components = ("mlp.down", "moe.down")
    state_reduce = "max"  # running maxima, also across ranks (each with its token's position)
    options = (Option("threshold", float, 50.0,
                      "detection: both |activations| must exceed this (the paper's 50)"),)

    def init_state(self, weight, dtype):
        rows, cols = weight.shape
        return (RunningMax.zeros(cols, dtype, weight.device),  # max |X_j| and its position
                RunningMax.zeros(rows, dtype, weight.device))  # max |Y_i| and its position

    def on_activations(self, state, weight, inputs, outputs, positions):
        if len(inputs):  # an expert may receive no tokens in a batch
            for x, peaks in zip((inputs, outputs), state):
                value, token = x.abs().max(0)
                peaks.update(value, positions[token])

    def finalize(self, state, weight, num_batches):
        max_in, max_out = (peaks.values for peaks in state)
        return max_out[:, None] * max_in[None, :] * weight.abs().to(max_in.dtype)

    def keep(self, state, weight):
        (max_in, max_out) = state
        return {"input_max": max_in.values, "input_token": max_in.at,
                "output_max": max_out.values, "output_token": max_out.at}

    def findings(self, kept: list[Kept]) -> list[Findings]:
        threshold = self.settings["threshold"]
        rows = []
        for k in kept:
            peaks = {side: RunningMax.merged([RunningMax(seed[f"{side}_max"],
                                                         seed[f"{side}_token"])
                                              for seed in k.seeds])
                     for side in ("input", "output")}
            col, row = int(peaks["input"].values.argmax()), int(peaks["output"].values.argmax())
            m = k.matrix_at(row)
            found = {"param": k.param, "layer": k.matrices[0].layer,
                     "component": m.component if m else None, "expert": k.expert,
                     "row": row, "col": col,
                     "output_max": float(peaks["output"].values[row]),
                     "output_token": int(peaks["output"].at[row]),
                     "input_max": float(peaks["input"].values[col]),
                     "input_token": int(peaks["input"].at[col])}
            found["passes"] = found["output_max"] > threshold and found["input_max"] > threshold
            rows.append(found)
        rows.sort(key=lambda d: (d["layer"] is None, d["layer"] or 0, d["expert"] or 0))
        return [Findings("super_weight_detection", "Super-weight detection, Yu et al. 2024",
                         COLUMNS, rows, note=RULE, mark="passes",
                         facts={"threshold": threshold})]
