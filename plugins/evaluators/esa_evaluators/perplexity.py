"""perplexity: perplexity and top-1 next-token accuracy on the run's held-out blocks.

Every token after the first of each block is predicted from the ones before it; perplexity is
exp of the mean cross-entropy over all those tokens (not a mean of per-block perplexities).
A perturbed model may output inf or NaN: that is a result, recorded, never an exception.
Each block's summed NLL, correct predictions and token count are returned too (`per_item`),
so that every change gets an interval over the evaluation blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from esa_core.api import DIFFERENCE, ITEM_EXP_MEAN, PER_ITEM, RELATIVE, EvalData, Evaluator, Measure
from esa_core.progress import track


class Perplexity(Evaluator):
    """Perplexity and top-1 next-token accuracy on the held-out blocks (the default)."""

    name = "perplexity"

    def measures(self) -> tuple[Measure, ...]:
        return (
            Measure("ppl", "ppl_change", higher_is_better=False, change=RELATIVE,
                    help="ppl_perturbed / ppl_baseline - 1", from_items=ITEM_EXP_MEAN),
            Measure("accuracy", "accuracy_drop", higher_is_better=True, change=DIFFERENCE,
                    help="accuracy_baseline - accuracy_perturbed"),
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: EvalData, label: str = "") -> dict:
        device = next(model.parameters()).device
        # per-block sums stay on the device: no host sync inside the batch loop, one transfer
        # at the end
        block_nll, block_correct = [], []
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        # an evaluation is one of many in a stage: a bar on a terminal, no end line in a log
        for batch in track(data.blocks.split(data.batch_size), label or "evaluating", "batches",
                           final=False):
            batch = batch.to(device, non_blocking=True)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nonfinite |= (~torch.isfinite(logits)).any()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            block_nll.append(nll.double().sum(-1))
            block_correct.append((logits.argmax(-1) == targets).sum(-1))
        nll_sums = torch.cat(block_nll).tolist()
        correct = torch.cat(block_correct).tolist()
        per_block = data.blocks.shape[1] - 1
        tokens = per_block * len(nll_sums)
        loss = math.fsum(nll_sums) / tokens
        if math.isnan(loss):
            ppl = math.nan
        else:
            ppl = math.exp(loss) if loss < 709.0 else math.inf  # exp overflows a double past 709
        counts = [per_block] * len(nll_sums)
        return {"ppl": ppl, "accuracy": sum(correct) / tokens, "loss": loss, "tokens": tokens,
                "nonfinite_outputs": bool(nonfinite),
                PER_ITEM: {"ppl": {"sum": nll_sums, "count": counts},
                           "accuracy": {"sum": correct, "count": counts}}}
