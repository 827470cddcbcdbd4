"""The guide's commands at full width: one block of Llama-3.1-8B's shape, one of Mixtral-8x7B's
experts, random weights from a config, a small vocabulary, 32-token blocks, on the CPU.

Every matrix here is larger than 2^24 elements, the size at which float32 index arithmetic
breaks (an 8B model's 58.7M-weight MLP matrices crashed the statistics stage after scoring);
tiny test models hide every such bug. Each shape is built once per module; each run's folder
serves several tests. Wall time and memory of each run: benchmarks/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from esa_core.cli import app
from esa_core.layout import RunFiles

pytestmark = pytest.mark.slow

HIDDEN, MLP = 4096, 14336  # Llama-3.1-8B; Mixtral-8x7B's experts are 14336 wide too
DENSE = dict(hidden_size=HIDDEN, intermediate_size=MLP, num_hidden_layers=1,
             num_attention_heads=32, num_key_value_heads=8)
# 8 experts of 14336 at hidden 4096 would be 1.4B weights, 17 GB to score in fp32: the hidden
# size is cut to 1280 so that CI fits, while every expert matrix (14336 x 1280 = 18.4M) stays
# past 2^24 and the fused gate_up tensor holds 294M weights.
MOE_HIDDEN = 1280
MOE = dict(hidden_size=MOE_HIDDEN, intermediate_size=MLP, num_hidden_layers=1,
           num_attention_heads=10, num_key_value_heads=2, num_local_experts=8,
           num_experts_per_tok=2)
SMALL_DATA = ["--device", "cpu", "--max-samples", "2", "--seq-len", "32", "--eval-samples", "2",
              "--batch-size", "1"]
PHASE_1 = ["--metric", "grad_x_weight", "--mode", "per_layer", "--topk", "100",
           "--seeds", "1337,123,999", "--stability-check", "--save-plots"]
PHASE_3 = ["--perturb", "sign_flip", "--controls", "random_k,bottom_k"]


def guide_run(model: Path, out_dir: Path, *flags: str) -> RunFiles:
    result = CliRunner().invoke(app, ["run", "--model", str(model), "--out-dir", str(out_dir),
                                      *SMALL_DATA, *flags])
    assert result.exit_code == 0, result.output
    return RunFiles.read(out_dir)




@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return tiny.save(tiny.llama_config(**DENSE), tmp_path_factory.mktemp("llama_8b_width"))


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    return tiny.save(tiny.family_config("mixtral", **MOE), tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def per_layer_run(dense, tmp_path_factory) -> RunFiles:
    """The guide's Phase-3 command (Phase 1 with sign_flip against random_k and bottom_k),
    plus --ablate-top 5: every stage Phase 1 has, and the evaluation and ablation stages."""
    return guide_run(dense, tmp_path_factory.mktemp("out") / "run", *PHASE_1, *PHASE_3,
                     "--ablate-top", "5")


def global_phase_3(seeds: str) -> list[str]:
    """Phase 3 with a global top-100; two seeds still give a stability summary (CI time)."""
    flags = [*PHASE_1, *PHASE_3]
    flags[flags.index("per_layer")] = "global"
    flags[flags.index("--seeds") + 1] = seeds
    return flags


@pytest.fixture(scope="module")
def global_run(dense, tmp_path_factory) -> RunFiles:
    return guide_run(dense, tmp_path_factory.mktemp("out") / "run", *global_phase_3("1337,123"))


#: the experts alone: a global top-100 over every scored matrix need not reach an expert of a
#: random-init model (the attention's scores can outrank them all), and the experts are what
#: this proxy is for (24 matrices past 2^24, fused in tensors of 294M weights)
EXPERTS = ["--include", "moe.gate,moe.up,moe.down"]


@pytest.fixture(scope="module")
def moe_run(moe, tmp_path_factory) -> RunFiles:
    return guide_run(moe, tmp_path_factory.mktemp("out") / "run", *global_phase_3("1337,123"),
                     *EXPERTS)


def check_rows_name_real_weights(run: RunFiles, folder: Path) -> None:
    """Each top_weights.csv row: param[row, col] (or param[expert, row, col]) is `weight`, in
    the model as transformers loads it (ESA not involved)."""
    params = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    for row in run.top:
        weight = params[row["param"]].detach()
        at = (row["row"], row["col"]) if row["expert"] is None else (
            row["expert"], row["row"], row["col"])
        assert float(weight[at]) == row["weight"], row


def test_per_layer_phase_1_stages_at_8b_width(per_layer_run, dense):
    run = per_layer_run
    assert run.manifest["status"] == "complete"
    assert set(run.manifest["timings"]) >= {"scoring_s", "selection_s", "stability_s",
                                            "evaluation_s", "ablation_s", "plots_s"}
    per_layer = run.stats["per_layer"]
    assert per_layer["layers.0.mlp.down"]["count"] == HIDDEN * MLP > 1 << 24
    total = sum(m["count"] for m in per_layer.values())
    scored = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 4 + 3 * HIDDEN * MLP  # q,o + k,v + mlp
    assert run.stats["global"]["count"] == total == scored
    hist = run.stats["weight_abs_histogram"]
    assert sum(hist["counts"]) + hist["below"] + hist["above"] == hist["count"] == scored
    assert len(run.top) == 7 * 100
    check_rows_name_real_weights(run, dense)
    assert run.stability["num_seeds"] == 3 and 0 <= run.stability["jaccard_mean"] <= 1
    assert sorted(p.name for p in (run.folder / "plots").iterdir()) == sorted(
        ["sensitivity_heatmap.png", "weight_distribution.png", "stability_analysis.png",
         "perturbation_effects.png", "ablation.png"])


def test_per_layer_phase_3_and_ablation_at_8b_width(per_layer_run):
    results = per_layer_run.perturbation
    for name in ("super_weights", "random_k", "bottom_k"):
        trials = results[name]["per_seed"]
        assert [t["seed"] for t in trials] == [1337, 123, 999]
        assert all(t["n_weights"] == 700 for t in trials)
    assert all(t["overlap_with_super"] == 0 for t in results["random_k"]["per_seed"])
    assert results["baseline"]["tokens"] == 2 * 31
    assert sorted(r["score_rank"] for r in per_layer_run.ablation) == [1, 2, 3, 4, 5]


def test_global_mode_at_8b_width(global_run, dense):
    run = global_run
    assert run.manifest["status"] == "complete" and len(run.top) == 100
    scores = [r["score"] for r in run.top]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == max(m["max"] for m in run.stats["per_layer"].values())
    check_rows_name_real_weights(run, dense)
    for name in ("super_weights", "random_k", "bottom_k"):
        assert all(t["n_weights"] == 100 for t in run.perturbation[name]["per_seed"])
    assert run.stability["mode"] == "global" and run.stability["num_seeds"] == 2


def test_mixtral_expert_width_global(moe_run, moe):
    run = moe_run
    assert run.manifest["status"] == "complete" and len(run.top) == 100
    experts = {k: m for k, m in run.stats["per_layer"].items() if m["expert"] is not None}
    assert len(experts) == 8 * 3 == len(run.stats["per_layer"])
    assert all(m["count"] == MOE_HIDDEN * MLP > 1 << 24 for m in experts.values())
    check_rows_name_real_weights(run, moe)
    assert all(r["expert"] is not None for r in run.top)
    # the global merge ranks across the experts' matrices: the top-100 is their 100 largest
    scores = [r["score"] for r in run.top]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == max(m["max"] for m in experts.values())
    for name in ("super_weights", "random_k", "bottom_k"):
        assert all(t["n_weights"] == 100 for t in run.perturbation[name]["per_seed"])
