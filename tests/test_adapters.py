"""Model adapters on tiny models of every family: coordinates, fused splits, experts, full runs.

Each claim is checked against something the adapter did not compute: the q/k/v tensors the
model's attention really receives, the routing its router really chose, the per-expert tensors
of the checkpoint on disk, a model rebuilt from the same seed.
"""

import contextlib
import csv
import json

import pytest
import tiny
import torch
from safetensors import safe_open
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from typer.testing import CliRunner

from esa_core.api import ACTIVATIONS, Metric
from esa_core.cli import app
from esa_core.engine import ScoringRun
from esa_core.errors import EsaError
from esa_core.selection import select

ATTN = {"attn.q", "attn.k", "attn.v", "attn.o"}
MLP = {"mlp.gate", "mlp.up", "mlp.down"}
EXPECTED = {  # family -> (adapter chosen by model_type, components it finds)
    "llama": ("llama", ATTN | MLP),
    "mistral": ("mistral", ATTN | MLP),
    "phi3": ("phi3", ATTN | MLP),
    "mixtral": ("mixtral", ATTN | {"moe.router", "moe.gate", "moe.up", "moe.down"}),
    "gpt_neox": ("gpt_neox", ATTN | {"mlp.up", "mlp.down"}),
    "qwen2": ("generic", ATTN | MLP),
    "gpt2": ("generic", {"other", "attn.o", "mlp.up", "mlp.down"}),
    "qwen2_moe": ("generic", ATTN | MLP | {"other"}),
}


def adapted(family: str, registry, **overrides):
    model = tiny.build(tiny.family_config(family, **overrides))
    return model, registry.adapter_for(model.config.model_type)()


def matrices_of(scored):
    return [m for s in scored for m in s.matrices]


def index_of(matrix, rows, cols):
    return (rows, cols) if matrix.expert is None else (torch.full_like(rows, matrix.expert),
                                                        rows, cols)


@pytest.mark.parametrize("family", EXPECTED)
def test_every_scored_weight_maps_back_to_its_parameter_once(family, registry):
    model, adapter = adapted(family, registry)
    expected_adapter, components = EXPECTED[family]
    scored = adapter.scored_params(model)
    matrices = matrices_of(scored)
    assert adapter.name == expected_adapter
    assert {m.component for m in matrices} == components
    # a distinct score per weight: a coordinate that points elsewhere reads another score
    scores = {s.name: torch.randperm(s.param.numel()).view(s.param.shape).float() for s in scored}
    every = sum(m.view(scores[m.param]).numel() for m in matrices)
    hits = {s.name: torch.zeros(s.param.shape) for s in scored}
    for picks in select(scores, matrices, every, "global").picks:
        index = index_of(picks.matrix, picks.rows, picks.cols)
        assert torch.equal(scores[picks.matrix.param][index], picks.scores)
        hits[picks.matrix.param].index_put_(index, torch.ones(len(picks)), accumulate=True)
    assert all(torch.equal(h, torch.ones_like(h)) for h in hits.values())  # each weight once
    params = dict(model.named_parameters())
    for m in matrices:  # each expert's slice of a 3-D tensor carries its expert, nothing else
        assert (m.expert is not None) == (params[m.param].dim() == 3)
        assert m.expert is not None or not m.component.startswith(("moe.gate", "moe.up",
                                                                  "moe.down"))


@contextlib.contextmanager
def bumped(param: torch.Tensor, index: tuple):
    """param[index] += 1 for the block, then the original value back bit for bit."""
    original = param.detach()[index].clone()
    with torch.no_grad():
        param[index] += 1.0
    try:
        yield
    finally:
        with torch.no_grad():
            param[index] = original


class AttentionProbe:
    """Records the query, key and value tensors the model's attention function receives."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, torch.Tensor]] = {}
        AttentionInterface.register("esa_probe", self)

    def __call__(self, module, query, key, value, *args, **kwargs):
        self.seen[module.layer_idx] = {"attn.q": query, "attn.k": key, "attn.v": value}
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    def run(self, model, ids) -> dict[int, dict[str, torch.Tensor]]:
        model.config._attn_implementation = "esa_probe"
        with torch.no_grad():
            model(input_ids=ids)
        return {layer: dict(t) for layer, t in self.seen.items()}


def changed_heads(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    """Heads (axis 1 of [batch, heads, tokens, head_dim]) whose values changed."""
    return set((before != after).any(dim=(0, 2, 3)).nonzero().flatten().tolist())


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
def test_fused_qkv_rows_change_only_their_own_projection_and_head(family, registry):
    """Bump one weight of each q/k/v matrix: only that tensor, in only that head, moves."""
    model, adapter = adapted(family, registry)
    d = model.config.hidden_size // model.config.num_attention_heads
    probe, ids = AttentionProbe(), tiny.blocks(1)
    before = probe.run(model, ids)
    fused = [m for m in matrices_of(adapter.scored_params(model))
             if m.rows is not None and m.component.startswith("attn.") and m.layer == 1]
    assert sorted(m.component for m in fused) == ["attn.k", "attn.q", "attn.v"]
    param = dict(model.named_parameters())[fused[0].param]
    for m in fused:
        for local in (0, d + 1, len(m.rows) - 1):
            row = int(m.real_row(torch.tensor(local)))
            with bumped(param, (row, 3)):
                after = probe.run(model, ids)[1]
            moved = {c: changed_heads(before[1][c], after[c]) for c in after}
            assert moved == {c: ({local // d} if c == m.component else set()) for c in moved}


def test_phi3_gate_up_rows_feed_the_activation_and_the_product(registry):
    """Phi3MLP: gate rows reach the activation's input; up rows only the down projection's."""
    model, adapter = adapted("phi3", registry)
    mlp = model.model.layers[0].mlp
    seen = {}
    hooks = [mlp.activation_fn.register_forward_hook(
                 lambda m, a, o: seen.__setitem__("act_in", a[0].clone())),
             mlp.down_proj.register_forward_hook(
                 lambda m, a, o: seen.__setitem__("down_in", a[0].clone()))]
    ids = tiny.blocks(1)

    def forward():
        with torch.no_grad():
            model(input_ids=ids)
        return dict(seen)

    before = forward()
    split = [m for m in matrices_of(adapter.scored_params(model))
             if m.param == "model.layers.0.mlp.gate_up_proj.weight"]
    assert [m.component for m in split] == ["mlp.gate", "mlp.up"]
    for m in split:
        local = 5
        row = int(m.real_row(torch.tensor(local)))
        with bumped(mlp.gate_up_proj.weight, (row, 0)):
            after = forward()
        act_cols = set((before["act_in"] != after["act_in"]).any(0).any(0).nonzero().flatten()
                       .tolist())
        down_cols = set((before["down_in"] != after["down_in"]).any(0).any(0).nonzero()
                        .flatten().tolist())
        assert act_cols == ({local} if m.component == "mlp.gate" else set())
        assert down_cols == {local}
    for h in hooks:
        h.remove()


class Routing:
    """The MoE block's input tokens and the experts the router chose for each (layer 0)."""

    def __init__(self, model) -> None:
        moe = model.model.layers[0].mlp
        self.hooks = [
            moe.register_forward_pre_hook(lambda m, a: setattr(self, "x", a[0].flatten(0, 1))),
            moe.gate.register_forward_hook(lambda m, a, o: setattr(self, "chosen", o[2])),
            moe.experts.register_forward_hook(lambda m, a, o: setattr(self, "out", o)),
        ]

    def tokens_of(self, expert: int) -> torch.Tensor:
        return (self.chosen == expert).any(-1).nonzero().flatten()

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def test_mixtral_expert_weights_change_only_tokens_routed_to_that_expert(registry):
    model, adapter = adapted("mixtral", registry)
    routing, ids = Routing(model), tiny.blocks(1, seq_len=32)
    with torch.no_grad():
        model(input_ids=ids)
    before = routing.out.clone()
    experts = model.model.layers[0].mlp.experts
    for m in matrices_of(adapter.scored_params(model)):
        if m.layer != 0 or m.expert is None or m.expert % 2:
            continue
        param = dict(model.named_parameters())[m.param]
        index = (m.expert, int(m.real_row(torch.tensor(1))), 2)
        with bumped(param, index), torch.no_grad():
            model(input_ids=ids)
        moved = set((routing.out != before).any(-1).nonzero().flatten().tolist())
        assert moved == set(routing.tokens_of(m.expert).tolist()) != set()
    assert experts.gate_up_proj.dim() == 3
    routing.remove()


def test_mixtral_activation_hooks_see_only_each_experts_routed_tokens(registry):
    """Inputs/outputs per expert, rebuilt by hand from the router's choice; router load too."""
    model, adapter = adapted("mixtral", registry)
    scored = {s.name: s for s in adapter.scored_params(model)}
    prefix = "model.layers.0.mlp."
    got: dict[tuple[str, int | None], list] = {}
    handles = [adapter.register_activation_hook(
                   scored[prefix + name],
                   lambda x, y, e, tokens=None, name=name:
                       got.setdefault((name, e), []).append((x, y, tokens)))
               for name in ("experts.gate_up_proj", "experts.down_proj", "gate.weight")]
    routing, ids = Routing(model), tiny.blocks(2, seq_len=24)
    with adapter.observe(model) as observed, torch.no_grad():
        model(input_ids=ids)
    experts, router = model.model.layers[0].mlp.experts, model.model.layers[0].mlp.gate
    x = routing.x
    torch.testing.assert_close(got[("gate.weight", None)][0][1], x @ router.weight.T)
    assert got[("gate.weight", None)][0][2] is None  # every token, in order
    # the router's own choice, recomputed: top-2 of the softmax of its logits
    chosen = torch.topk(torch.softmax(x @ router.weight.T, -1), 2, dim=-1).indices
    assert torch.equal(chosen.sort(-1).values, routing.chosen.sort(-1).values)
    half = experts.gate_up_proj.shape[1] // 2
    for e in range(experts.num_experts):
        tokens = (chosen == e).any(-1).nonzero().flatten()
        xe = x[tokens]
        gate_up = xe @ experts.gate_up_proj[e].T
        hidden = F.silu(gate_up[:, :half]) * gate_up[:, half:]
        [(x_in, y_out, rows)] = got[("experts.gate_up_proj", e)]
        torch.testing.assert_close(x_in, xe)
        torch.testing.assert_close(y_out, gate_up)
        assert rows.tolist() == tokens.tolist()  # which tokens of the batch the rows are
        [(h_in, d_out, rows)] = got[("experts.down_proj", e)]
        assert rows.tolist() == tokens.tolist()
        torch.testing.assert_close(h_in, hidden)
        torch.testing.assert_close(d_out, hidden @ experts.down_proj[e].T)
    load = observed["router_load"]["per_layer"]["layers.0"]
    assert load == torch.bincount(chosen.flatten(), minlength=experts.num_experts).tolist()
    assert sum(load) == ids.numel() * 2
    for h in (*handles, routing):
        h.remove()


class RoutedTokens(Metric):
    """Test metric: counts the tokens the engine shows each matrix (in its [0, 0] score)."""

    name = "routed_tokens"
    needs = frozenset({ACTIVATIONS})

    def on_activations(self, state, weight, inputs, outputs, positions):
        assert inputs.shape[1] == weight.shape[1] and outputs.shape[1] == weight.shape[0]
        state[0, 0] += len(inputs)

    def finalize(self, state, weight, num_batches):
        return state


def test_activation_metrics_on_mixtral_see_the_router_load_per_expert(registry):
    model, adapter = adapted("mixtral", registry)
    scored = adapter.scored_params(model)
    blocks = tiny.blocks(3, seq_len=16)
    with adapter.observe(model) as observed:
        scores = ScoringRun(model, adapter, scored, RoutedTokens(),
                            progress=False).score(blocks, seed=0)
    for layer, load in observed["router_load"]["per_layer"].items():
        for name in ("experts.gate_up_proj", "experts.down_proj"):
            seen = scores[f"model.{layer}.mlp.{name}"][:, 0, 0]
            assert seen.tolist() == load
        assert scores[f"model.{layer}.mlp.gate.weight"][0, 0] == blocks.numel()
    assert scores["model.layers.0.self_attn.q_proj.weight"][0, 0] == blocks.numel()


def test_super_weight_on_mixtral_experts_reports_block_positions(registry):
    """Each expert's detection row, by hand from the router's own choice: the channel maxima
    over the tokens routed to it, and the position within its block of the token that gave each
    (not the token's count among the expert's routed tokens)."""
    from esa_core.pipeline import kept_by_matrix

    model, adapter = adapted("mixtral", registry)
    scored = adapter.scored_params(model, include=["moe.down"])
    seq_len, blocks = 24, tiny.blocks(3, seq_len=24, seed=1)
    seen: dict[int, list] = {}  # layer -> per block: (moe input, chosen experts)
    hooks = []
    for layer, block in enumerate(model.model.layers):
        moe = block.mlp
        hooks += [moe.register_forward_pre_hook(
                      lambda m, a, layer=layer: seen.setdefault(layer, []).append(
                          [a[0].flatten(0, 1)])),
                  moe.gate.register_forward_hook(
                      lambda m, a, o, layer=layer: seen[layer][-1].append(o[2]))]
    metric = registry.get("metric", "super_weight")()
    run = ScoringRun(model, adapter, scored, metric, progress=False)
    run.score(blocks, seed=0)
    for h in hooks:
        h.remove()
    [table] = metric.findings(kept_by_matrix(scored, [run.kept]))
    rows = {(d["layer"], d["expert"]): d for d in table.rows}
    moved = 0
    for layer, forwards in seen.items():
        experts = model.model.layers[layer].mlp.experts
        half = experts.gate_up_proj.shape[1] // 2
        for e in range(experts.num_experts):
            ins, outs, where, count = [], [], [], []
            for x, chosen in forwards:  # one forward per block (batch size 1)
                tokens = (chosen == e).any(-1).nonzero().flatten()
                gate_up = x[tokens] @ experts.gate_up_proj[e].detach().T
                hidden = F.silu(gate_up[:, :half]) * gate_up[:, half:]
                ins.append(hidden.abs())
                outs.append((hidden @ experts.down_proj[e].detach().T).abs())
                where.append(tokens % seq_len)
                count.append(torch.arange(len(tokens)) + sum(map(len, count)))
            x, y, where = torch.cat(ins), torch.cat(outs), torch.cat(where)
            (in_max, in_token), (out_max, out_token) = x.max(0), y.max(0)
            col, row = int(in_max.argmax()), int(out_max.argmax())
            d = rows[layer, e]
            assert (d["row"], d["col"]) == (row, col)
            assert d["output_max"] == pytest.approx(float(out_max[row]), rel=1e-5)
            assert d["input_max"] == pytest.approx(float(in_max[col]), rel=1e-5)
            assert (d["output_token"], d["input_token"]) == (int(where[out_token[row]]),
                                                             int(where[in_token[col]]))
            counted = int(torch.cat(count)[out_token[row]]) % seq_len
            moved += counted != d["output_token"]
    assert moved  # the old reading (count among routed tokens) differs here


@pytest.mark.parametrize(("family", "include", "exclude", "expected"), [
    ("phi3", ["attn.k"], [], {"attn.k"}),
    ("phi3", [], ["attn.q", "mlp.*"], {"attn.k", "attn.v", "attn.o"}),
    ("mixtral", ["moe.down", "mlp.down"], [], {"moe.down"}),
    ("mixtral", [], ["moe.*"], ATTN),
    ("llama", ["embed", "lm_head"], [], ATTN | MLP | {"embed", "lm_head"}),
    ("gpt_neox", ["embed", "attn.*"], [], ATTN | {"embed"}),
])
def test_include_exclude_pick_logical_matrices(family, include, exclude, expected, registry):
    model, adapter = adapted(family, registry)
    matrices = matrices_of(adapter.scored_params(model, include, exclude))
    assert {m.component for m in matrices} == expected
    if family == "phi3" and include == ["attn.k"]:  # only the key rows of the fused qkv tensor
        assert {len(m.rows) for m in matrices} == {2 * 8}


def test_unknown_component_in_a_filter_is_an_error(registry):
    model, adapter = adapted("llama", registry)
    with pytest.raises(EsaError, match="unknown component 'atn.q'.*attn.q"):
        adapter.scored_params(model, include=["mlp.down", "atn.q"])


def test_fused_sizes_that_do_not_fit_the_tensor_are_refused(registry):
    model, _ = adapted("phi3", registry)
    model.config.num_key_value_heads = 4  # as if the wrong adapter met this checkpoint
    with pytest.raises(EsaError, match="do not split exactly"):
        registry.get("model adapter", "phi3")().scored_params(model)


def test_generic_adapter_refuses_activations_of_transposed_conv1d(registry):
    model, adapter = adapted("gpt2", registry)
    [c_attn] = [s for s in adapter.scored_params(model) if s.name.endswith("0.attn.c_attn.weight")]
    assert c_attn.matrices[0].component == "other" and c_attn.matrices[0].rows is None
    with pytest.raises(EsaError, match="Conv1D"):
        adapter.register_activation_hook(c_attn, lambda x, y, e: None)


def test_generic_adapter_leaves_a_fused_tensor_whole_as_other(registry):
    model = tiny.build(tiny.family_config("gpt_neox"))
    generic = registry.get("model adapter", "generic")()
    found = {s.name.split(".", 3)[-1]: [m.component for m in s.matrices]
             for s in generic.scored_params(model) if ".layers.0." in s.name}
    assert found == {"attention.query_key_value.weight": ["other"],
                     "attention.dense.weight": ["attn.o"], "mlp.dense_h_to_4h.weight": ["mlp.up"],
                     "mlp.dense_4h_to_h.weight": ["mlp.down"]}


def reference_weight(family, folder, model, row) -> float:
    """The weight a CSV row names, read from the built model or, for the old Mixtral per-expert
    checkpoint layout that transformers 5 writes, straight from the safetensors file."""
    param = dict(model.named_parameters())[row["param"]].detach()
    r, c = int(row["row"]), int(row["col"])
    if param.dim() == 2:
        return float(param[r, c])
    e, half = int(row["expert"]), param.shape[1] // 2
    if family != "mixtral":
        return float(param[e, r, c])
    layer = f"model.layers.{row['layer']}.block_sparse_moe.experts.{e}."
    name, r = {"moe.gate": ("w1", r), "moe.up": ("w3", r - half), "moe.down": ("w2", r)}[
        row["component"]]
    with safe_open(folder / "model.safetensors", "pt") as f:
        return float(f.get_tensor(f"{layer}{name}.weight")[r, c])


@pytest.mark.parametrize("family", EXPECTED)
def test_esa_run_on_a_saved_tiny_model_indexes_the_true_weights(family, tmp_path):
    config = tiny.family_config(family)
    folder = tiny.save(config, tmp_path / family)
    text = tmp_path / "calibration.txt"
    text.write_text(tiny.wikitext_sample(30_000), encoding="utf-8")
    out = tmp_path / "out"
    argv = ["run", "--model", str(folder), "--metric", "grad_x_weight", "--mode", "per_layer",
            "--topk", "5", "--max-samples", "2", "--seq-len", "16", "--eval-samples", "2",
            "--dataset", str(text), "--device", "cpu", "--out-dir", str(out)]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    with open(out / "top_weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    assert manifest["model"]["adapter"] == EXPECTED[family][0]
    assert len(rows) == 5 * manifest["model"]["n_matrices"]
    assert {r["component"] for r in rows} == EXPECTED[family][1]
    model = tiny.build(config)  # same seed as the saved folder: the true weights
    for row in rows:
        assert float(row["weight"]) == reference_weight(family, folder, model, row), row
        assert (row["expert"] != "") == (model.get_parameter(row["param"]).dim() == 3)
    stats = json.loads((out / "sensitivity_stats.json").read_text())
    if family == "mixtral":
        load = stats["router_load"]["per_layer"]
        assert set(load) == {"layers.0", "layers.1"}
        assert all(sum(v) == 2 * 16 * 2 for v in load.values())  # blocks * tokens * top_k
        assert "layers.1.moe.up.expert3" in stats["per_layer"]
    else:
        assert "router_load" not in stats


def test_device_map_reaches_the_loader(tiny_llama_dir, tmp_path, monkeypatch):
    """--device-map is handed to from_pretrained (accelerate places the model) and recorded."""
    import transformers

    asked = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        asked.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    text = tmp_path / "calibration.txt"
    text.write_text(tiny.wikitext_sample(30_000), encoding="utf-8")
    argv = ["run", "--model", str(tiny_llama_dir), "--device-map", "auto", "--topk", "2",
            "--max-samples", "1", "--seq-len", "16", "--eval-samples", "1", "--dataset",
            str(text), "--out-dir", str(tmp_path / "out")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert asked == ["auto"]
    manifest = json.loads((tmp_path / "out" / "experiment_manifest.json").read_text())
    assert manifest["config"]["device_map"] == "auto"
    bad = CliRunner().invoke(app, [*argv[:3], "--device-map", "everywhere"])
    assert bad.exit_code == 2 and "unknown device map 'everywhere'" in bad.output
