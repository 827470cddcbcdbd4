"""grad_x_weight against plain autograd, batch by batch, summed by hand."""

import tiny
import torch

from esa_core.engine import ScoringRun, batch_loss


def test_grad_x_weight_equals_per_batch_autograd(registry):
    model = tiny.build(tiny.llama_config())
    adapter = registry.get("model adapter", "llama")()
    scored = adapter.scored_params(model)
    blocks = tiny.blocks(6, seq_len=12)
    batch_size = 2

    expected = {s.name: torch.zeros_like(s.param) for s in scored}
    for batch in blocks.split(batch_size):
        model.zero_grad()
        batch_loss(model, batch).backward()
        for s in scored:
            expected[s.name] += (s.param.grad * s.param.detach()).abs()
    model.zero_grad(set_to_none=True)
    n_batches = len(blocks) // batch_size

    metric = registry.get("metric", "grad_x_weight")()
    scores = ScoringRun(model, adapter, scored, metric, batch_size=batch_size,
                        progress=False).score(blocks, seed=0)

    assert set(scores) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(scores[name], value / n_batches, rtol=1e-5, atol=1e-9)


def test_gradients_are_freed_and_unscored_weights_get_none(registry):
    model = tiny.build(tiny.llama_config())
    adapter = registry.get("model adapter", "llama")()
    scored = adapter.scored_params(model)
    metric = registry.get("metric", "grad_x_weight")()
    ScoringRun(model, adapter, scored, metric, progress=False).score(tiny.blocks(2), seed=0)
    assert all(p.grad is None for p in model.parameters())
    # requires_grad is restored after scoring
    assert all(p.requires_grad for p in model.parameters())
