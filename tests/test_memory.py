"""Memory options: gradient checkpointing really recomputes and leaves scores unchanged;
bf16 accumulators give the fp32 scores to bf16 precision."""

import pytest
import tiny
import torch

from esa_core.api import ACTIVATIONS, GRAD, HVP, Metric
from esa_core.engine import ScoringRun
from esa_core.errors import EsaError


class DiagonalCurvature(Metric):
    """z * Hz summed: exercises the engine's double-backward path under checkpointing."""

    name = "diag_curvature_test"
    needs = frozenset({HVP})
    probes = 2

    def on_hvp(self, state, weight, hz, z):
        state.add_(hz * z)


class GradAndInputs(Metric):
    name = "grad_and_inputs_test"
    needs = frozenset({GRAD, ACTIVATIONS})


def _score(registry, metric, **options):
    model = tiny.build(tiny.llama_config())  # SDPA attention: HVPs must avoid its fused kernels
    adapter = registry.get("model adapter", "llama")()
    scored = adapter.scored_params(model)
    calls = []
    q_proj = model.model.layers[0].self_attn.q_proj
    handle = q_proj.register_forward_hook(lambda *_: calls.append(1))
    scores = ScoringRun(model, adapter, scored, metric, progress=False,
                        **options).score(tiny.blocks(3, seq_len=12), seed=5)
    handle.remove()
    return scores, len(calls), model


@pytest.mark.parametrize("metric_name", ["grad_x_weight", "hvp"])
def test_gradient_checkpointing_recomputes_and_keeps_the_scores(registry, metric_name):
    def metric():
        return DiagonalCurvature() if metric_name == "hvp" else registry.get(
            "metric", metric_name)()

    plain, plain_calls, _ = _score(registry, metric())
    saved, saved_calls, model = _score(registry, metric(), gradient_checkpointing=True)
    assert plain_calls == 3
    assert saved_calls >= 6  # every block ran again in the backward pass: it was checkpointed
    for name, value in plain.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-5, atol=1e-10)
    assert all(p.grad is None for p in model.parameters())
    # the model's own forward is back: a later forward runs each block once
    counted = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: counted.append(1))
    model(input_ids=tiny.blocks(1)).logits.sum().backward()
    assert len(counted) == 1


def test_gradient_checkpointing_refuses_a_metric_that_reads_activations(registry):
    with pytest.raises(EsaError, match="every activation twice"):
        _score(registry, GradAndInputs(), gradient_checkpointing=True)


def test_bf16_accumulator_matches_fp32_to_bf16_precision(registry):
    metric = registry.get("metric", "grad_x_weight")
    wide, _, _ = _score(registry, metric())
    narrow, _, _ = _score(registry, metric(), accum_dtype=torch.bfloat16)
    for name, value in wide.items():
        assert narrow[name].dtype == torch.bfloat16
        torch.testing.assert_close(narrow[name].float(), value, rtol=2e-2, atol=1e-7)


def test_bf16_accumulator_and_checkpointing_end_to_end(tiny_llama_dir, tmp_path):
    from esa_core import pipeline

    text = tmp_path / "text.txt"
    text.write_text(tiny.wikitext_sample(40_000), encoding="utf-8")
    result = pipeline.run(model=str(tiny_llama_dir), dataset=str(text), max_samples=3,
                          seq_len=32, topk=4, device="cpu", eval_samples=2,
                          accum_dtype="bf16", gradient_checkpointing=True,
                          out_dir=str(tmp_path / "out"))
    assert result.manifest["config"]["accum_dtype"] == "bf16"
    assert result.manifest["config"]["gradient_checkpointing"] is True
    assert (result.out_dir / "top_weights.csv").read_text().count("\n") == 1 + 4 * 14
