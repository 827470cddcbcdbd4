"""Each built-in metric against an independent computation on a tiny model.

Gradient metrics against plain per-batch autograd; activation metrics against inputs and outputs
captured by our own forward hooks; hutchinson_diag against the exact Hessian of a model of a few
hundred weights; super_weight against a planted spike.
"""

import json

import pytest
import tiny
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from esa_core.config import RunConfig
from esa_core.engine import ScoringRun, batch_loss
from esa_core.errors import EsaError
from esa_core.selection import select

METRICS = ("grad_x_weight", "grad_squared", "act_mag", "hutchinson_diag", "magnitude",
           "super_weight")


def score(registry, model, scored, metric, blocks, batch_size=1, seed=0, **options):
    """Scores from the engine, with `metric` by name or as an instance."""
    if isinstance(metric, str):
        metric = registry.get("metric", metric)(**options)
    adapter = registry.get("model adapter", "llama")()
    return ScoringRun(model, adapter, scored, metric, batch_size=batch_size,
                      progress=False).score(blocks, seed=seed)


def llama(registry, include=(), **config):
    model = tiny.build(tiny.llama_config(**config))
    return model, registry.get("model adapter", "llama")().scored_params(model, include)


def captured_activations(model, scored, blocks):
    """Every scored matrix's inputs [tokens, in] and outputs [tokens, out], by our own hooks."""
    seen = {s.name: ([], []) for s in scored}
    handles = []
    for s in scored:
        def hook(module, args, output, name=s.name):
            seen[name][0].append(args[0].reshape(-1, args[0].shape[-1]))
            seen[name][1].append(output.reshape(-1, output.shape[-1]))
        handles.append(s.module.register_forward_hook(hook))
    with torch.no_grad():
        for block in blocks:
            model(input_ids=block[None], use_cache=False)
    for h in handles:
        h.remove()
    return {name: (torch.cat(x), torch.cat(y)) for name, (x, y) in seen.items()}


# --------------------------------------------------------------------------- gradient metrics


def test_grad_squared_is_mean_of_per_batch_squared_gradients(registry):
    model, scored = llama(registry)
    blocks, batch_size = tiny.blocks(6, seq_len=12), 2
    expected = {s.name: torch.zeros_like(s.param) for s in scored}
    for batch in blocks.split(batch_size):
        model.zero_grad()
        batch_loss(model, batch).backward()
        for s in scored:
            expected[s.name] += s.param.grad**2
    model.zero_grad(set_to_none=True)

    scores = score(registry, model, scored, "grad_squared", blocks, batch_size)
    for name, value in expected.items():
        torch.testing.assert_close(scores[name], value / 3, rtol=1e-5, atol=1e-14)


# --------------------------------------------------------------------------- activation metrics


def test_act_mag_is_weight_times_input_norm_over_all_tokens(registry):
    model, scored = llama(registry)
    blocks = tiny.blocks(3, seq_len=10)
    scores = score(registry, model, scored, "act_mag", blocks)
    for s in scored:
        inputs, _ = captured_activations(model, [s], blocks)[s.name]
        norms = torch.tensor([sum(float(x) ** 2 for x in inputs[:, j]) ** 0.5
                              for j in range(inputs.shape[1])])
        torch.testing.assert_close(scores[s.name], s.param.detach().abs() * norms,
                                   rtol=1e-4, atol=1e-7)


def test_super_weight_is_max_output_times_max_input_times_weight(registry):
    model, scored = llama(registry, include=("mlp.down",))
    blocks = tiny.blocks(3, seq_len=10)
    scores = score(registry, model, scored, "super_weight", blocks)
    captured = captured_activations(model, scored, blocks)
    for s in scored:
        inputs, outputs = captured[s.name]
        expected = torch.empty_like(s.param)
        for i in range(expected.shape[0]):
            for j in range(expected.shape[1]):
                expected[i, j] = (outputs[:, i].abs().max() * inputs[:, j].abs().max()
                                  * s.param[i, j].abs())
        torch.testing.assert_close(scores[s.name], expected, rtol=1e-5, atol=1e-8)


def test_super_weight_finds_a_planted_spike_that_magnitude_misses(registry):
    model, scored = llama(registry, include=("mlp.down",))
    mlp = model.model.layers[1].mlp
    down = mlp.down_proj.weight
    row, col = 5, 7
    with torch.no_grad():
        top = down.abs().max()
        down[row, col] = 4 * top
        down[2, 3] = 8 * top  # a larger weight on a channel that does not spike
        mlp.up_proj.weight[col] *= 30  # input channel `col` of down_proj now spikes
    matrices = [m for s in scored for m in s.matrices]
    blocks = tiny.blocks(2, seq_len=10)

    (picks, i), *_ = select(score(registry, model, scored, "super_weight", blocks), matrices,
                            1, "global").ranked()
    assert (picks.matrix.key, int(picks.rows[i]), int(picks.cols[i])) == \
        ("layers.1.mlp.down", row, col)
    (picks, i), *_ = select(score(registry, model, scored, "magnitude", blocks), matrices,
                            1, "global").ranked()
    assert (int(picks.rows[i]), int(picks.cols[i])) == (2, 3)


# --------------------------------------------------------------------------- magnitude


def test_magnitude_is_abs_weight_and_reads_no_data(registry):
    model, scored = llama(registry)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    scores = score(registry, model, scored, "magnitude", tiny.blocks(2))
    assert not calls
    for s in scored:
        assert torch.equal(scores[s.name], s.param.detach().abs())


# --------------------------------------------------------------------------- hutchinson_diag

SMALL = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)  # 576 scored weights


def exact_hessians(model, scored, blocks) -> list[torch.Tensor]:
    """The full Hessian of each block's loss in the scored weights (flattened, in scored order)."""
    names = [s.name for s in scored]
    shapes = [s.param.shape for s in scored]
    flat = torch.cat([s.param.detach().reshape(-1) for s in scored])

    def hessian(block):
        def loss_of(weights):
            params = {n: w.view(shape)
                      for n, w, shape in zip(names, weights.split([s.numel() for s in shapes]),
                                             shapes)}
            with sdpa_kernel(SDPBackend.MATH):
                logits = torch.func.functional_call(
                    model, params, (), {"input_ids": block[None], "use_cache": False}).logits
            return torch.nn.functional.cross_entropy(logits[0, :-1], block[1:])

        return torch.autograd.functional.hessian(loss_of, flat, vectorize=True)

    return [hessian(block) for block in blocks]


def flat(scores, scored):
    return torch.cat([scores[s.name].reshape(-1) for s in scored])


def test_hutchinson_equals_z_times_exact_hessian_z_for_its_probes(registry):
    model, scored = llama(registry, **SMALL)
    blocks = tiny.blocks(2, seq_len=8)
    hessians = exact_hessians(model, scored, blocks)
    probes = 2

    metric = registry.get("metric", "hutchinson_diag")(probes=probes)
    seen_z = []
    metric.on_hvp = lambda state, weight, hz, z, add=metric.on_hvp: (
        seen_z.append(z.reshape(-1)), add(state, weight, hz, z))
    saliency = flat(score(registry, model, scored, metric, blocks), scored)

    zs = torch.cat(seen_z).view(len(blocks), probes, -1)  # engine order: batch, probe, matrix
    assert set(zs.unique().tolist()) == {-1.0, 1.0}
    estimate = sum(z * (h @ z) for h, batch_z in zip(hessians, zs) for z in batch_z)
    diag = (estimate / (len(blocks) * probes)).abs()
    weights = torch.cat([s.param.detach().reshape(-1) for s in scored])
    expected = 0.5 * diag * weights**2
    # fp32 sums of z·Hz terms that nearly cancel: tolerance relative to the largest score
    torch.testing.assert_close(saliency, expected, rtol=1e-4, atol=1e-5 * expected.max())
    raw = flat(score(registry, model, scored, "hutchinson_diag", blocks, probes=probes,
                     score="raw"), scored)
    torch.testing.assert_close(raw, diag, rtol=1e-4, atol=1e-5 * diag.max())


def test_hutchinson_error_shrinks_as_probes_grow(registry):
    model, scored = llama(registry, include=("mlp.down",), **SMALL)
    blocks = tiny.blocks(1, seq_len=8)
    exact = exact_hessians(model, scored, blocks)[0].diagonal().abs()

    def error(probes):
        raw = score(registry, model, scored, "hutchinson_diag", blocks, probes=probes,
                    score="raw")
        return float((flat(raw, scored) - exact).norm() / exact.norm())

    # the estimator's error falls as 1/sqrt(probes): 8x from 1 to 64 probes
    assert error(64) < error(1) / 3


# --------------------------------------------------------------------------- options and runs


@pytest.mark.parametrize("args, message", [
    ({"probes": "0"}, "at least 1"),
    ({"probes": "two"}, "needs a int"),
    ({"score": "exact"}, "must be one of: saliency, raw"),
    ({"probe": "4"}, "no option 'probe'"),
])
def test_bad_metric_options_are_clear_errors(registry, args, message):
    with pytest.raises(EsaError, match=message):
        RunConfig(metric="hutchinson_diag", metric_args=args).validate(registry)


def test_metrics_without_options_refuse_any(registry):
    with pytest.raises(EsaError, match="act_mag has no option 'probes'. Valid options: none"):
        RunConfig(metric="act_mag", metric_args={"probes": "2"}).validate(registry)


def test_list_plugins_shows_options_and_scope():
    from typer.testing import CliRunner

    from esa_core.cli import app

    out = CliRunner().invoke(app, ["list-plugins", "--json"]).output
    rows = {r["name"]: r for r in json.loads(out) if r["kind"] == "metric"}
    assert set(METRICS) <= set(rows)
    assert "probes=1 (int)" in rows["hutchinson_diag"]["options"]
    assert "score='saliency' (str)" in rows["hutchinson_diag"]["options"]
    assert rows["super_weight"]["scores only"] == "mlp.down, moe.down"
    assert "needs" not in rows["magnitude"]


@pytest.fixture(scope="module")
def small_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "sample.txt"
    path.write_text(tiny.wikitext_sample(40_000), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """Saved tiny models, one per family, made on first use."""
    made = {}

    def get(family):
        if family not in made:
            made[family] = tiny.save(tiny.family_config(family),
                                     tmp_path_factory.mktemp(f"tiny-{family}"))
        return made[family]

    return get


REFUSED = {  # the generic adapter refuses these clearly rather than misread the activations
    ("act_mag", "gpt2"): "Conv1D weight stored as \\[in, out\\]",
    ("super_weight", "gpt2"): "Conv1D weight stored as \\[in, out\\]",
    # its fused 3-D expert tensors; super_weight still scores the shared expert's mlp.down
    ("act_mag", "qwen2_moe"): "cannot capture activations",
}


@pytest.mark.parametrize("family", tiny.FAMILIES)
@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_runs_end_to_end(family_dirs, small_text, tmp_path, metric, family):
    import esa_core

    args = {"probes": "2"} if metric == "hutchinson_diag" else {}
    settings = dict(model=str(family_dirs(family)), metric=metric, dataset=small_text,
                    seq_len=16, max_samples=2, eval_samples=2, mode="global", topk=5,
                    device="cpu", metric_args=args, out_dir=str(tmp_path / "out"))
    if (metric, family) in REFUSED:
        with pytest.raises(EsaError, match=REFUSED[metric, family]):
            esa_core.run(**settings)
        return
    result = esa_core.run(**settings)
    assert len(result.selection) == 5
    manifest = json.loads((result.out_dir / "experiment_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["metric"]["name"] == metric
    assert manifest["metric"]["options"] == {"hutchinson_diag": {"probes": 2, "score": "saliency"},
                                             "super_weight": {"threshold": 50.0}}.get(metric, {})
    components = set(manifest["metric"]["components"])
    if metric == "super_weight":
        assert components and components <= {"mlp.down", "moe.down"}
        stats = json.loads((result.out_dir / "sensitivity_stats.json").read_text())
        detected = stats["findings"]["super_weight_detection"]["rows"]
        assert len(detected) == int(manifest["model"]["n_matrices"])
        assert "Super-weight detection" in (result.out_dir /
                                                         "report.html").read_text()
        assert {p.matrix.component for p in result.selection.picks} <= components
    else:  # the adapter's whole default set, not narrowed to down-projections
        assert components - {"mlp.down", "moe.down"}


def test_include_overrides_a_metrics_default_scope(tiny_llama_dir, small_text, tmp_path):
    import esa_core

    result = esa_core.run(model=str(tiny_llama_dir), metric="super_weight", dataset=small_text,
                          seq_len=16, max_samples=2, eval_samples=2, topk=3, device="cpu",
                          include=["mlp.up", "mlp.down"], out_dir=str(tmp_path / "out"))
    assert result.manifest["metric"]["components"] == ["mlp.down", "mlp.up"]


# --------------------------------------------------------------------------- embedded model

REMOVAL_METRICS = ("grad_x_weight", "act_mag", "hutchinson_diag", "super_weight")


@pytest.mark.slow
def test_embedded_top1_weights_matter_far_more_than_random_ones(tmp_path):
    """Zeroing each metric's global top-1 weight of SmolLM2-135M, on held-out text.

    The metrics that estimate the effect of removing a weight must find one whose loss raises
    perplexity by over 10%, a hundred times more than a random weight of the same matrix, and ten
    times more than the largest weight (magnitude's top-1, the data-free baseline).
    grad_squared is left out: it measures sensitivity to a small change, not to removal.
    """
    import esa_core
    from esa_core import data, loading
    from esa_core.plugins import registry

    settings = dict(mode="global", topk=1, seq_len=64, max_samples=4, eval_samples=4,
                    device="cpu", dtype="fp32")
    top1 = {}
    for metric in (*REMOVAL_METRICS, "magnitude"):
        result = esa_core.run(metric=metric, out_dir=str(tmp_path / metric), **settings)
        (picks, i), = result.selection.ranked()
        top1[metric] = (picks.matrix.param, int(picks.rows[i]), int(picks.cols[i]))

    adapter = registry().get("model adapter", "llama")()
    model, tokenizer = adapter.load(loading.resolve(None), torch.float32, torch.device("cpu"))
    held_out = data.tokenize(data.read_texts("wikitext2"), tokenizer, 64, 4).eval_blocks
    params = dict(model.named_parameters())

    def ppl_change_without(param, row, col):
        weight = params[param].data
        kept = weight[row, col].clone()
        weight[row, col] = 0
        with torch.no_grad():
            loss = batch_loss(model, held_out)
        weight[row, col] = kept
        return float(torch.exp(loss - baseline)) - 1

    with torch.no_grad():
        baseline = batch_loss(model, held_out)
    generator = torch.Generator().manual_seed(0)
    change = {}
    for metric, (param, row, col) in top1.items():
        rows, cols = params[param].shape
        random = (int(torch.randint(rows, (1,), generator=generator)),
                  int(torch.randint(cols, (1,), generator=generator)))
        change[metric] = (ppl_change_without(param, row, col),
                          ppl_change_without(param, *random))
    print(top1, change)
    baseline_top = change["magnitude"][0]
    for metric in REMOVAL_METRICS:
        top, random = change[metric]
        assert top > 0.1 and top > 100 * abs(random) and top > 10 * baseline_top, \
            (metric, top1[metric], top, random)


def test_super_weight_detection_matches_the_papers_rule_written_independently(registry):
    """Yu et al.'s rule by hand: hook every down_proj, take the flat argmax of |input| and of
    |output| over all calibration tokens, name [output channel, input channel], compare both
    magnitudes with the threshold. Planted: a spike through layers.1 down_proj[5, 7]."""
    from esa_core.pipeline import kept_by_matrix

    model, scored = llama(registry, include=("mlp.down",))
    mlp = model.model.layers[1].mlp
    with torch.no_grad():
        mlp.down_proj.weight[5, 7] = 4 * mlp.down_proj.weight.abs().max()
        mlp.up_proj.weight[7] *= 30
    seq_len, blocks = 10, tiny.blocks(3, seq_len=10, seed=2)
    seen = {}

    def hook(name):
        def record(module, args, output):
            x, y = args[0].reshape(-1, args[0].shape[-1]), output.reshape(-1, output.shape[-1])
            seen.setdefault(name, ([], []))[0].append(x.detach().abs())
            seen[name][1].append(y.detach().abs())
        return record

    handles = [s.module.register_forward_hook(hook(s.name)) for s in scored]
    with torch.no_grad():
        for block in blocks:
            model(input_ids=block[None])
    for h in handles:
        h.remove()
    expected = {}
    threshold = None
    for name, (xs, ys) in seen.items():
        x, y = torch.cat(xs), torch.cat(ys)
        tx, col = divmod(int(x.argmax()), x.shape[1])
        ty, row = divmod(int(y.argmax()), y.shape[1])
        expected[name] = (row, col, float(y[ty, row]), ty % seq_len, float(x[tx, col]),
                          tx % seq_len)
    planted = expected["model.layers.1.mlp.down_proj.weight"]
    others = max(max(e[2], e[4]) for n, e in expected.items() if "layers.1." not in n)
    threshold = (min(planted[2], planted[4]) + others) / 2  # only the planted layer passes
    assert min(planted[2], planted[4]) > others and planted[:2] == (5, 7)

    metric = registry.get("metric", "super_weight")(threshold=str(threshold))
    run = ScoringRun(model, registry.get("model adapter", "llama")(), scored, metric,
                     progress=False)
    seeds = []
    for seed, part in ((0, blocks[:2]), (1, blocks[2:])):  # two seeds' streams, kept apart
        run.score(part, seed=seed)
        seeds.append(run.kept)
    [table] = metric.findings(kept_by_matrix(scored, seeds))
    assert table.facts == {"threshold": threshold} and table.mark == "passes"
    assert len(table.rows) == len(expected)
    for d in table.rows:
        row, col, out_max, out_tok, in_max, in_tok = expected[d["param"]]
        assert (d["row"], d["col"], d["output_token"], d["input_token"]) == \
            (row, col, out_tok, in_tok)
        assert d["output_max"] == pytest.approx(out_max, rel=1e-6)
        assert d["input_max"] == pytest.approx(in_max, rel=1e-6)
        assert d["passes"] == ("layers.1." in d["param"])
