"""Stability across seeds, heavy tails and success criteria, against hand-computed answers."""

import csv
import json

import numpy as np
import pytest
import tiny
import torch
from typer.testing import CliRunner

from esa_core import data, pipeline
from esa_core.api import LogicalMatrix
from esa_core.cli import app
from esa_core.engine import ScoringRun
from esa_core.selection import param_offsets, select
from esa_core.stability import SeedTop, capture, jaccard, rank_correlation, summarize
from esa_core.stats import sensitivity_stats

GUIDE_KEYS = {"jaccard_mean", "jaccard_std", "jaccard_all", "num_seeds", "topk_overlap_size"}


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "wiki.txt"
    path.write_text(tiny.wikitext_sample(), encoding="utf-8")
    return path


def small_run(model_dir, text_file, out_dir, **settings):
    settings = {"model": str(model_dir), "dataset": str(text_file), "seq_len": 16,
                "max_samples": 4, "eval_samples": 2, "topk": 8, "out_dir": str(out_dir),
                **settings}
    return pipeline.run(argv=["test"], **settings)


# --------------------------------------------------------------------------- hand examples


def test_jaccard_hand_examples():
    assert jaccard({1, 2, 3}, {2, 3, 4}) == 2 / 4
    assert jaccard([5, 6], [6, 5]) == 1.0
    assert jaccard([], []) == 1.0  # two empty sets are identical
    assert jaccard([], [1]) == 0.0
    assert jaccard([1, 2], [3]) == 0.0
    assert jaccard(np.array([7, 8, 9]), np.array([9])) == 1 / 3


def test_rank_correlation_hand_examples():
    a, b = np.array([1., 2, 3, 4]), np.array([10., 20, 30, 40])
    assert rank_correlation(a, b) == pytest.approx(1)
    assert rank_correlation(np.array([1., 2, 3]), np.array([3., 2, 1])) == pytest.approx(-1)
    # ranks differ by 1 at four places: rho = 1 - 6 * 4 / (5 * (25 - 1)) = 0.8
    a, b = np.array([1., 2, 3, 4, 5]), np.array([2., 1, 4, 3, 5])
    assert rank_correlation(a, b) == pytest.approx(0.8)
    assert rank_correlation(np.array([1., 1, 1]), np.array([1., 2, 3])) is None
    assert rank_correlation(np.array([1.]), np.array([2.])) is None


def _seed(keys):
    """A SeedTop whose one unit holds `keys` with scores 8, 7, 6, ... (highest first)."""
    keys = np.array(keys, dtype=np.int64)
    return SeedTop({"global": (keys, np.arange(len(keys), 0, -1, dtype=float))})


HAND = {1337: _seed([1, 2, 3, 4, 5, 6, 7, 8]),
        123: _seed([2, 1, 3, 5, 4, 6, 7, 9]),
        999: _seed([1, 3, 2, 4, 10, 11, 12, 13])}


def test_summary_of_hand_made_seeds():
    s = summarize(HAND, k=2, mode="global")
    # top-2 sets: {1,2}, {1,2}, {1,3}; pairs in --seeds order: (1337,123) (1337,999) (123,999)
    assert s["pairs"] == [[1337, 123], [1337, 999], [123, 999]]
    assert s["jaccard_all"] == pytest.approx([1, 1 / 3, 1 / 3])
    assert s["jaccard_mean"] == pytest.approx(5 / 9)
    # sample SD: squared deviations (4/9)², (2/9)², (2/9)² = 24/81, over n - 1 = 2
    assert s["jaccard_std"] == pytest.approx((24 / 81 / 2) ** 0.5)
    assert s["num_seeds"] == 3
    assert s["topk_overlap_size"] == 1 and s["topk_union_size"] == 3
    by_k = {row["k"]: row for row in s["overlap_vs_k"]}
    assert sorted(by_k) == [1, 2, 4, 8]  # k/4 and k/2 round down to 1
    assert by_k[1]["jaccard_all"] == pytest.approx([0, 1, 0])
    assert by_k[8]["jaccard_all"] == pytest.approx([7 / 9, 4 / 12, 4 / 12])
    # over the union {1,2,3}: scores (8,7,6), (7,8,6), (8,6,7) -> rho 0.5, 0.5, -0.5
    rank = s["rank_correlation"]
    assert rank["spearman_all"] == pytest.approx([0.5, 0.5, -0.5])
    assert rank["known_fraction"] == 1.0
    assert "per_layer" not in s


def test_rank_correlation_ranks_an_unrecorded_weight_last():
    s = summarize(HAND, k=4, mode="global")
    # union {1..5}; seed 999 never recorded weight 5, so it ranks below all its recorded ones:
    # 1337 scores (8,7,6,5,4), 999 (8,6,7,5,-inf): ranks differ at two places -> rho 0.9
    assert s["rank_correlation"]["spearman_all"][1] == pytest.approx(0.9)
    assert s["rank_correlation"]["known_fraction"] == pytest.approx(14 / 15)


def test_capture_keeps_each_seeds_top_k_exactly(registry):
    model = tiny.build(tiny.llama_config())
    adapter = registry.get("model adapter", "llama")()
    scored = adapter.scored_params(model)
    matrices = [m for s in scored for m in s.matrices]
    metric = registry.get("metric", "grad_x_weight")()
    scores = ScoringRun(model, adapter, scored, metric, progress=False).score(tiny.blocks(2), 0)
    offsets = param_offsets({s.name: s.param for s in scored})
    for mode in ("per_layer", "global"):
        top = capture(scores, matrices, offsets, 5, mode)
        # brute force: encode the selected weights by hand as offset + row * cols + col
        expected = set()
        for picks in select(scores, matrices, 5, mode).picks:
            cols = scores[picks.matrix.param].shape[1]
            start = offsets[picks.matrix.param]
            expected |= {start + int(r) * cols + int(c) for r, c in zip(picks.rows, picks.cols)}
        assert set(top.top_set(5).tolist()) == expected
        assert all(len(keys) == len(set(keys.tolist())) for keys, _ in top.units.values())


# --------------------------------------------------------------------------- seeds and the run


def test_csv_ranks_by_the_mean_of_the_seeds_scores(tiny_llama_dir, text_file, tmp_path,
                                                   registry):
    seeds = [1337, 123, 999]
    result = small_run(tiny_llama_dir, text_file, tmp_path / "run", seeds=seeds,
                       stability_check=True)
    draws = {int(s): v["calibration_blocks"] for s, v in result.manifest["seeds"].items()}
    assert draws[1337] != draws[123] != draws[999]

    # by hand: each seed's blocks scored on their own, averaged, ranked per matrix with topk
    model = tiny.build(tiny.llama_config())  # the saved model's weights
    adapter = registry.get("model adapter", "llama")()
    scored = adapter.scored_params(model)
    tokens = data.tokenize(data.read_texts(str(text_file)), tiny.tokenizer(), 16, 2)
    run = ScoringRun(model, adapter, scored, registry.get("metric", "grad_x_weight")(),
                     progress=False)
    per_seed = {s: run.score(tokens.calibration_pool[draws[s]], s) for s in seeds}
    mean = {n: sum(per_seed[s][n] for s in seeds) / 3 for n in per_seed[1337]}
    expected = set()
    for name, value in mean.items():
        top = torch.topk(value.reshape(-1), 8).indices
        expected |= {(name, int(i) // value.shape[1], int(i) % value.shape[1]) for i in top}
    with open(result.out_dir / "top_weights.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["param"], int(r["row"]), int(r["col"])) for r in rows} == expected
    for r in rows:
        hand = float(mean[r["param"]][int(r["row"]), int(r["col"])])
        assert float(r["score"]) == pytest.approx(hand, rel=1e-5)
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)

    # the summary's Jaccard is that of the seeds' own top-k sets, computed here by hand
    def weights(selection):
        return {(p.matrix.param, int(r), int(c)) for p in selection.picks
                for r, c in zip(p.rows, p.cols)}
    own = {s: weights(result.seed_selections[s]) for s in seeds}
    for s in seeds:
        hand = {(n, int(i) // v.shape[1], int(i) % v.shape[1])
                for n, v in per_seed[s].items() for i in torch.topk(v.reshape(-1), 8).indices}
        assert own[s] == hand
    summary = json.loads((result.out_dir / "stability_summary.json").read_text())
    hand = [len(own[a] & own[b]) / len(own[a] | own[b]) for a, b in summary["pairs"]]
    assert summary["jaccard_all"] == pytest.approx(hand)
    assert summary["topk_overlap_size"] == len(own[1337] & own[123] & own[999])
    assert set(summary["per_layer"]) == {m.key for s in scored for m in s.matrices}


def test_one_seed_skips_stability_with_a_note(tiny_llama_dir, text_file, tmp_path):
    result = small_run(tiny_llama_dir, text_file, tmp_path / "run", seeds=[1337],
                       stability_check=True)
    assert not (result.out_dir / "stability_summary.json").exists()
    assert "has one" in result.manifest["stability"]["skipped"]
    rows = {r["criterion"]: r for r in result.manifest["success_criteria"]}
    assert rows["stability: jaccard_mean"]["verdict"] == "SKIP"
    assert "one" in rows["stability: jaccard_mean"]["note"]


def test_a_data_free_metric_skips_the_stability_criteria_with_the_reason(
        tiny_llama_dir, text_file, tmp_path):
    # magnitude reads no data: its seeds agree by construction, which proves nothing
    result = small_run(tiny_llama_dir, text_file, tmp_path / "run", metric="magnitude",
                       seeds=[1337, 123], stability_check=True)
    summary = json.loads((result.out_dir / "stability_summary.json").read_text())
    assert summary["jaccard_all"] == [1.0]
    assert "no calibration data" in summary["data_free_note"]
    rows = {r["criterion"]: r for r in result.manifest["success_criteria"]}
    for name in ("stability: jaccard_mean", "stability: jaccard_std"):
        assert rows[name]["verdict"] == "SKIP"
        assert rows[name]["note"] == summary["data_free_note"]
    # a metric that reads data keeps its verdict: test_cli_stability_check_writes_the_guides_keys


def test_cli_stability_check_writes_the_guides_keys(tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "run", "--model", str(tiny_llama_dir), "--dataset", str(text_file), "--seq-len", "16",
        "--max-samples", "4", "--eval-samples", "2", "--topk", "8",
        "--seeds", "1337,123,999", "--stability-check", "--out-dir", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "stability_summary.json").read_text())
    assert GUIDE_KEYS <= set(summary)
    assert summary["num_seeds"] == 3 and len(summary["jaccard_all"]) == 3
    assert 0.0 <= summary["jaccard_mean"] <= 1.0
    assert "data_free_note" not in summary  # grad_x_weight reads data
    manifest = json.loads((out / "experiment_manifest.json").read_text())
    rows = {r["criterion"]: r for r in manifest["success_criteria"]}
    mean_row = rows["stability: jaccard_mean"]
    assert mean_row["value"] == summary["jaccard_mean"]
    assert mean_row["verdict"] == ("PASS" if summary["jaccard_mean"] > 0.3 else "FAIL")
    assert "stability: jaccard_mean" in result.output and "heavy tail" in result.output


# --------------------------------------------------------------------------- heavy tails


def _stats_of(values: np.ndarray, topk: int = 100) -> dict:
    scores = {"w": torch.from_numpy(values.reshape(1000, -1)).float()}
    return sensitivity_stats(scores, [LogicalMatrix("w", 0, "mlp.down")], topk=topk)["global"]


def test_hill_recovers_the_index_of_a_pareto_sample():
    alpha = 2.0
    rng = np.random.default_rng(0)
    sample = (1.0 - rng.random(1_000_000)) ** (-1.0 / alpha)  # Pareto(x_min = 1, alpha)
    stats = _stats_of(sample)
    assert stats["hill_order_statistics"] == 1000  # the top 0.1 %
    # Hill's standard error is alpha / sqrt(k) = 0.063 here: 10 % is about three of them
    assert stats["hill_tail_index"] == pytest.approx(alpha, rel=0.10)
    assert stats["heavy_tailed"] is True
    top = np.sort(sample)[::-1][:100].mean()
    assert stats["topk_mean_median_ratio"] == pytest.approx(top / stats["quantiles"]["q0.5"],
                                                            rel=1e-5)


def test_a_gaussian_sample_is_not_heavy_tailed():
    rng = np.random.default_rng(0)
    stats = _stats_of(np.abs(rng.standard_normal(1_000_000)))
    assert stats["heavy_tailed"] is False
    assert stats["hill_tail_index"] > 4
    assert abs(stats["excess_kurtosis"] - 0.869) < 0.05  # half-normal: 8(pi-3)/(pi-2)^2
