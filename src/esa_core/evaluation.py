"""Perplexity and top-1 next-token accuracy on the held-out evaluation blocks.

Every token after the first of each block is predicted from the ones before it; perplexity is
exp of the mean cross-entropy over all those tokens (not a mean of per-block perplexities).
A perturbed model may output inf or NaN: that is a result, recorded, never an exception.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from esa_core.progress import track


@dataclass
class Evaluation:
    """One model state's score on the evaluation blocks."""

    loss: float  # mean next-token cross-entropy, nats
    ppl: float  # exp(loss); inf or NaN when the model's outputs were not finite
    accuracy: float  # fraction of next tokens whose argmax prediction is right
    tokens: int  # tokens predicted
    nonfinite_outputs: bool  # any logit was inf or NaN

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, blocks: torch.Tensor, batch_size: int = 1,
             progress: bool = False, label: str = "evaluating") -> Evaluation:
    """Perplexity and accuracy of `model` on token `blocks` [n, seq_len], `batch_size` at a time."""
    device = next(model.parameters()).device
    # sums stay on the device: no host sync inside the batch loop, one transfer at the end
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    tokens = 0
    batches = blocks.split(batch_size)
    for batch in track(batches, label, "batches", final=False) if progress else batches:
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
    return Evaluation(loss, ppl, int(correct) / tokens, tokens, bool(nonfinite))
