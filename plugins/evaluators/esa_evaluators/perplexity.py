"""perplexity: perplexity and top-1 next-token accuracy on the run's held-out blocks.

Every token after the first of each block is predicted from the ones before it; perplexity is
exp of the mean cross-entropy over all those tokens (not a mean of per-block perplexities).
A perturbed model may output inf or NaN: that is a result, recorded, never an exception.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from esa_core.api import DIFFERENCE, RELATIVE, EvalData, Evaluator, Measure
from esa_core.progress import track


class Perplexity(Evaluator):
    """Perplexity and top-1 next-token accuracy on the held-out blocks (the default)."""

    name = "perplexity"

    def measures(self) -> tuple[Measure, ...]:
        return (
            Measure("ppl", "ppl_change", higher_is_better=False, change=RELATIVE,
                    help="ppl_perturbed / ppl_baseline - 1"),
            Measure("accuracy", "accuracy_drop", higher_is_better=True, change=DIFFERENCE,
                    help="accuracy_baseline - accuracy_perturbed"),
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: EvalData, label: str = "") -> dict:
        device = next(model.parameters()).device
        # sums stay on the device: no host sync inside the batch loop, one transfer at the end
        total_loss = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        tokens = 0
        # an evaluation is one of many in a stage: a bar on a terminal, no end line in a log
        for batch in track(data.blocks.split(data.batch_size), label or "evaluating", "batches",
                           final=False):
            batch = batch.to(device, non_blocking=True)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nonfinite |= (~torch.isfinite(logits)).any()
            total_loss += nn.functional.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="sum").double()
            correct += (logits.argmax(-1) == targets).sum()
            tokens += targets.numel()
        loss = float(total_loss) / tokens
        if math.isnan(loss):
            ppl = math.nan
        else:
            ppl = math.exp(loss) if loss < 709.0 else math.inf  # exp overflows a double past 709
        return {"ppl": ppl, "accuracy": int(correct) / tokens, "loss": loss, "tokens": tokens,
                "nonfinite_outputs": bool(nonfinite)}
