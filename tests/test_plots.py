"""Figures from result files alone: valid PNGs, the right numbers, the same bytes every time."""

import shutil
import struct
from itertools import combinations

import numpy as np
import pytest
import result_folders
import torch

from esa_core.api import LogicalMatrix
from esa_core.layout import FIGURES, RunFiles, read_json
from esa_core.plots import (
    heatmap_grid,
    jaccard_matrix,
    perturbation_effects,
    render,
    sensitivity_heatmap,
)
from esa_core.results import write_json
from esa_core.stats import hill_tail_index, sensitivity_stats, weight_histogram

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(data: bytes) -> tuple[int, int]:
    """Width and height from the PNG's IHDR chunk (after checking the signature)."""
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def figures(full_result):
    return render(RunFiles.read(full_result))


def test_every_figure_is_a_png_of_sensible_size(figures):
    assert figures.skipped == {}
    assert set(figures.png) == set(FIGURES)
    for name, data in figures.png.items():
        width, height = png_size(data)
        assert 1200 <= width <= 2400, name
        assert 500 <= height <= 2000, name
        assert len(data) > 20_000, name  # drawn, not an empty canvas


def test_same_results_give_the_same_bytes(figures, full_result, tmp_path):
    copy = shutil.copytree(full_result, tmp_path / "elsewhere")
    assert render(RunFiles.read(copy)).png == figures.png


def test_missing_stage_files_skip_their_figure_with_a_reason(tmp_path):
    result_folders.write_core(tmp_path, layers=3, topk=4)
    figures = render(RunFiles.read(tmp_path))
    assert set(figures.png) == {"sensitivity_heatmap.png", "weight_distribution.png"}
    assert "--stability-check" in figures.skipped["stability_analysis.png"]
    assert "--perturb" in figures.skipped["perturbation_effects.png"]


def test_moe_heatmap_has_an_expert_axis_and_stays_readable(tmp_path):
    result_folders.write_core(tmp_path, layers=32, experts=8, topk=5, mode="global",
                              model_id="Mixtral-8x7B-v0.1", shape=(4, 6))
    run = RunFiles.read(tmp_path)
    fig = sensitivity_heatmap(run)
    top, _ = fig.axes[:2]
    labels = [t.get_text() for t in top.get_yticklabels()]
    # 4 attention matrices + router, then gate/up/down for each of the 8 experts
    assert len(labels) == 5 + 3 * 8
    assert labels[5:7] == ["moe.gate e0", "moe.gate e1"]
    assert all(t.get_fontsize() >= 7 for t in top.get_yticklabels())
    width, height = png_size(render(run).png["sensitivity_heatmap.png"])
    assert height <= 2600 and width <= 2000


def test_heatmap_grid_matches_a_direct_count(full_result):
    run = RunFiles.read(full_result)
    grid = heatmap_grid(run.stats, run.top)
    for i, (component, expert) in enumerate(grid.rows):
        for j, layer in enumerate(grid.layers):
            entry = [e for e in run.stats["per_layer"].values()
                     if (e["layer"], e["component"], e["expert"]) == (layer, component, expert)]
            scores = [w["score"] for w in run.top
                      if (w["layer"], w["component"], w["expert"]) == (layer, component, expert)]
            assert grid.peak[i, j] == entry[0]["max"]
            assert grid.count[i, j] == len(scores) == 20  # per_layer, k = 20
            assert grid.top_mean[i, j] == pytest.approx(sum(scores) / len(scores))
    # the planted super weight's matrix holds the largest score of all
    i, j = np.unravel_index(np.nanargmax(grid.peak), grid.peak.shape)
    assert (grid.rows[i], grid.layers[j]) == (("mlp.down", None), 2)


def test_jaccard_matrix_is_symmetric_in_pair_order():
    seeds = [1337, 123, 999]
    values = [0.5, 0.6, 0.7]
    expected = np.array([[1.0, 0.5, 0.6], [0.5, 1.0, 0.7], [0.6, 0.7, 1.0]])
    np.testing.assert_array_equal(
        jaccard_matrix(seeds, list(combinations(seeds, 2)), values), expected)


def test_a_seed_whose_model_output_went_nonfinite_is_drawn_not_dropped(full_result, tmp_path):
    folder = shutil.copytree(full_result, tmp_path / "run")
    results = read_json(folder / "perturbation_results.json")
    trial = results["super_weights"]["per_seed"][1]
    trial.update(ppl=None, ppl_change=None, ppl_change_nonfinite="nan")
    write_json(folder / "perturbation_results.json", results)
    fig = perturbation_effects(RunFiles.read(folder))
    assert [t.get_text() for t in fig.axes[0].texts] == ["non-finite"]
    assert len(fig.axes[0].lines) > 0


# ---- the statistics the figures draw from (sensitivity_stats.json additions)


def test_ccdf_is_exact_in_the_tail_and_close_in_the_bulk():
    g = torch.Generator().manual_seed(0)
    score = torch.randn(200, 300, generator=g).abs() ** 3  # 60,000 scores, sample of 4096
    stats = sensitivity_stats({"w": score}, [LogicalMatrix("w", 0, "mlp.down")])
    ccdf = stats["global"]["ccdf"]
    flat = score.reshape(-1).double()
    exact_ranks = stats["global"]["hill_order_statistics"]
    for x, p in zip(ccdf["score"], ccdf["fraction_at_least"]):
        true = float((flat >= x).double().mean())
        if p * flat.numel() <= exact_ranks:
            assert true == pytest.approx(p, abs=0.5 / flat.numel())
        else:  # from a 4096-value sample: binomial error (4 SD) and its 1/4096 resolution
            assert true == pytest.approx(p, abs=4 * (p * (1 - p) / 4096) ** 0.5 + 4 / 4096)
    assert ccdf["fraction_at_least"][0] == pytest.approx(1 / flat.numel())
    assert ccdf["score"][0] == pytest.approx(float(flat.max()))


def test_per_component_tail_index_is_hill_on_that_component_alone():
    g = torch.Generator().manual_seed(1)
    scores = {f"l{i}.{c}": torch.rand(40, 50, generator=g) ** (-1 / (2 + i))
              for i in range(2) for c in ("q", "down")}
    matrices = [LogicalMatrix(name, int(name[1]), "attn.q" if name.endswith("q") else "mlp.down")
                for name in scores]
    stats = sensitivity_stats(scores, matrices)
    for component in ("attn.q", "mlp.down"):
        values = torch.cat([scores[m.param].reshape(-1) for m in matrices
                            if m.component == component])
        k = stats["per_component"][component]["hill_order_statistics"]
        # k order statistics above the threshold, the (k+1)-th largest score
        expected, used = hill_tail_index(torch.sort(values, descending=True).values[:k + 1])
        assert used == k
        assert stats["per_component"][component]["hill_tail_index"] == pytest.approx(expected)
        assert stats["per_component"][component]["count"] == values.numel()


def test_weight_histogram_matches_numpy():
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(30, 40, generator=g) * 0.02, torch.randn(7, 9, generator=g) * 300]
    weights[0][0, :5] = 0.0  # zeros fall below the lowest bin
    hist = weight_histogram(weights)
    values = np.abs(np.concatenate([w.reshape(-1).numpy() for w in weights])).astype(np.float64)
    edges = np.asarray(hist["bin_edges"])
    counts, _ = np.histogram(values, edges)
    inside = (values >= edges[0]) & (values <= edges[-1])
    # a value within float32 rounding of an edge may land in either neighbouring bin
    assert np.abs(np.asarray(hist["counts"]) - counts).sum() <= 2
    assert sum(hist["counts"]) == inside.sum()
    assert hist["below"] == (values < edges[0]).sum() >= 5
    assert hist["above"] == (values > edges[-1]).sum() > 0
    assert hist["count"] == values.size
