"""--ablate-top: each candidate zeroed alone, measured, restored; checked against a hand loop."""

import csv
import itertools
import math

import pytest
import tiny
import torch
from esa_evaluators.perplexity import Perplexity
from test_evaluation import hand_loop, run_tiny

from esa_core import ablation
from esa_core.api import EvalData, LogicalMatrix
from esa_core.bench import Bench
from esa_core.selection import select

COLUMNS = ("rank,param,layer,component,expert,row,col,score_rank,score,weight,ppl,ppl_ratio,"
           "ppl_ratio_ci_low,ppl_ratio_ci_high,accuracy_drop,accuracy_drop_ci_low,"
           "accuracy_drop_ci_high").split(",")


def measured(model, blocks):
    """Perplexity, accuracy and each block's NLL from the hand loop."""
    block_nll, block_hits = hand_loop(model, blocks)
    count = len(blocks) * (blocks.shape[1] - 1)
    return math.exp(sum(block_nll) / count), sum(block_hits) / count, block_nll


def test_ppl_ratio_equals_a_hand_made_zero_evaluate_restore_loop(registry, tmp_path):
    model = tiny.build(tiny.llama_config())
    blocks = tiny.blocks(4, seq_len=16, seed=5)
    params = {n: p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight")}
    matrices = [LogicalMatrix(n, i, "mlp.down") for i, n in enumerate(params)]
    scores = {n: p.detach().abs() for n, p in params.items()}  # |w|: big weights first
    selection = select(scores, matrices, 6, "global")
    top_rows = [{"rank": r, "param": picks.matrix.param, "layer": picks.matrix.layer,
                 "component": "mlp.down", "expert": None, "row": int(picks.rows[i]),
                 "col": int(picks.cols[i]), "score": repr(float(picks.scores[i])),
                 "weight": "0"} for r, (picks, i) in enumerate(selection.ranked(), start=1)]
    before = {n: p.detach().clone() for n, p in params.items()}
    bench = Bench(model, params, [Perplexity()], EvalData(blocks, None, 2))
    entry = ablation.run(bench.on_blocks(ablation.ablation_blocks(blocks, 10)),
                         registry.get("perturbation", "zero")(), selection, top_rows, 5, 1.0001,
                         tmp_path)

    base_ppl, base_acc, base_nll = measured(model, blocks)
    expected = {}
    for top in top_rows[:5]:  # the hand-made loop: zero, evaluate, restore
        weight = params[top["param"]]
        with torch.no_grad():
            saved = weight[top["row"], top["col"]].clone()
            weight[top["row"], top["col"]] = 0.0
            ppl, acc, nll = measured(model, blocks)
            weight[top["row"], top["col"]] = saved
        # the ratio on each of the 4^4 equally likely resamples of the 4 blocks
        every = [math.exp(sum(nll[i] - base_nll[i] for i in pick) / (4 * 15))
                 for pick in itertools.product(range(4), repeat=4)]
        expected[top["rank"]] = (ppl / base_ppl, ppl, base_acc - acc, every)
    for name, p in params.items():
        assert torch.equal(p.detach(), before[name])  # restored bit-exactly

    with (tmp_path / "ablation.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        rows = list(reader)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5]
    assert sorted(int(r["score_rank"]) for r in rows) == [1, 2, 3, 4, 5]
    ratios = [float(r["ppl_ratio"]) for r in rows]
    assert ratios == sorted(ratios, reverse=True)  # ranked by measured effect
    for r in rows:
        ratio, ppl, drop, every = expected[int(r["score_rank"])]
        assert float(r["ppl_ratio"]) == pytest.approx(ratio, rel=1e-5)
        # its interval over the blocks: percentiles of the exact resampling distribution
        low, high = float(r["ppl_ratio_ci_low"]), float(r["ppl_ratio_ci_high"])
        every.sort()
        assert every[3] * (1 - 1e-6) <= low <= every[12] * (1 + 1e-6)
        assert every[-13] * (1 - 1e-6) <= high <= every[-4] * (1 + 1e-6)
        assert float(r["ppl"]) == pytest.approx(ppl, rel=1e-5)
        assert float(r["accuracy_drop"]) == pytest.approx(drop, abs=1e-9)
    critical = {w["score_rank"] for w in entry["critical_weights"]}
    assert critical == {rank for rank, e in expected.items() if e[0] >= 1.0001}
    ranks = sorted(expected, key=lambda k: -expected[k][0])  # Spearman by hand: no ties here
    d2 = sum((ranks.index(k) - (k - 1)) ** 2 for k in expected)
    assert entry["spearman_score_vs_effect"] == pytest.approx(1 - 6 * d2 / (5 * (25 - 1)))


def test_each_candidate_is_a_resume_unit(registry, tmp_path, monkeypatch):
    from esa_core.resume import Checkpoints

    model = tiny.build(tiny.llama_config())
    params = {n: p for n, p in model.named_parameters() if n.endswith("mlp.down_proj.weight")}
    matrices = [LogicalMatrix(n, i, "mlp.down") for i, n in enumerate(params)]
    selection = select({n: p.detach().abs() for n, p in params.items()}, matrices, 3, "global")
    top_rows = [{"rank": r, "param": picks.matrix.param, "layer": picks.matrix.layer,
                 "component": "mlp.down", "expert": None, "row": int(picks.rows[i]),
                 "col": int(picks.cols[i]), "score": "1.0", "weight": "0"}
                for r, (picks, i) in enumerate(selection.ranked(), start=1)]

    zero = registry.get("perturbation", "zero")()

    def ablate():
        bench = Bench(model, params, [Perplexity()], EvalData(tiny.blocks(2, seq_len=12), None, 2),
                      Checkpoints(tmp_path, {"run": 1}))
        return ablation.run(bench, zero, selection, top_rows, 2, 2.0, tmp_path)

    first = ablate()
    written = (tmp_path / "ablation.csv").read_text()
    assert {p.name for p in (tmp_path / "checkpoints").iterdir()} >= {
        "ablate_baseline.json", "ablate_1.json", "ablate_2.json"}
    class Recomputed(Exception):
        pass

    def refuse(one, *args):
        raise Recomputed(int(one.picks[0].rows[0]), int(one.picks[0].cols[0]))

    monkeypatch.setattr(ablation, "perturbed", refuse)
    (tmp_path / "checkpoints" / "ablate_2.json").unlink()  # as if interrupted before it
    with pytest.raises(Recomputed) as caught:  # the saved candidate is not evaluated again
        ablate()
    assert caught.value.args == (top_rows[1]["row"], top_rows[1]["col"])
    monkeypatch.undo()
    assert ablate() == first
    assert (tmp_path / "ablation.csv").read_text() == written


def test_ablate_top_in_a_run_writes_the_csv_manifest_and_report(tiny_llama_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(tiny.wikitext_sample(40_000))
    result = run_tiny(tiny_llama_dir, text, tmp_path / "out", mode="global", ablate_top=4,
                      ablate_eval_samples=2, critical_ratio=1.0, save_plots=True)
    with (result.out_dir / "ablation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and list(rows[0]) == COLUMNS
    entry = result.manifest["ablation"]
    assert entry["eval_blocks"] == 2 and entry["candidates"] == 4
    # critical: removing it alone multiplies perplexity by >= 1.0, from the written values
    baseline = entry["baseline"]["ppl"]
    assert {w["score_rank"] for w in entry["critical_weights"]} == {
        int(r["score_rank"]) for r in rows if float(r["ppl"]) / baseline >= 1.0}
    for r in rows:  # each ratio with its interval over the 2 blocks
        assert float(r["ppl_ratio_ci_low"]) <= float(r["ppl_ratio_ci_high"])
    assert "ablation_s" in result.manifest["timings"]
    page = (result.out_dir / "report.html").read_text()
    assert "Ablation: each of the top 4 weights removed alone" in page
    assert (result.out_dir / "plots" / "ablation.png").is_file()
    assert not math.isnan(float(rows[0]["ppl_ratio"]))
