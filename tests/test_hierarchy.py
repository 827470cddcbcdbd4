"""The hierarchy row against its null: scores independent of the matrix must FAIL at every
size, a planted hot layer must PASS, whatever the mode or the size of the top-k."""

import math

import pytest
import torch

from esa_core import hierarchy
from esa_core.api import LogicalMatrix
from esa_core.selection import select

COMPONENTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")


def model_scores(layers: int, components: int, shape: tuple[int, int], seed: int,
                 hot_layer: int | None = None):
    """Heavy-tailed scores drawn independently of the matrix (log-normal), optionally x10 in
    every matrix of one layer."""
    g = torch.Generator().manual_seed(seed)
    matrices, scores = [], {}
    for layer in range(layers):
        for component in COMPONENTS[:components]:
            name = f"layers.{layer}.{component}"
            matrices.append(LogicalMatrix(name, layer, component))
            scores[name] = torch.randn(shape, generator=g).mul(2.0).exp()
            if layer == hot_layer:
                scores[name] *= 10.0
    return matrices, scores


SIZES = [(1, 3, (4, 4)), (2, 7, (8, 6)), (4, 7, (16, 16)), (12, 7, (32, 24))]


@pytest.mark.parametrize("layers, components, shape", SIZES)
def test_scores_independent_of_the_matrix_fail_at_every_size(layers, components, shape):
    for seed in range(3):
        matrices, scores = model_scores(layers, components, shape, seed)
        # the old rule's trap: a global top-5 sits inside at most 5 matrices
        top = select(scores, matrices, 5, "global")
        assert 1 <= len(top.picks) <= 9
        h = hierarchy.judge(hierarchy.densities(scores, matrices))
        assert h["hierarchical"] is False, (layers, components, seed, h)
        assert hierarchy.row(h)["verdict"] == "FAIL"


def test_a_single_outlier_weight_is_not_a_layer_pattern():
    matrices, scores = model_scores(12, 7, (32, 24), seed=5)
    scores["layers.3.mlp.down"][1, 2] = 1e6  # one super weight: its matrix is far hotter
    h = hierarchy.judge(hierarchy.densities(scores, matrices))
    assert h["layer"]["hottest"] == "3" and h["layer"]["ratio_to_rest"] > 2
    assert h["layer"]["p_value"] > 0.05 and h["hierarchical"] is False


@pytest.mark.parametrize("layers, components, shape", SIZES[1:])
def test_a_planted_hot_layer_passes(layers, components, shape):
    hot = layers // 2
    matrices, scores = model_scores(layers, components, shape, seed=7, hot_layer=hot)
    h = hierarchy.judge(hierarchy.densities(scores, matrices))
    assert h["layer"]["hottest"] == str(hot) and h["layer"]["ratio_to_rest"] > 2
    # the hot layer's matrices land together in one of the L layers with chance L / C(n, c)
    n, c = layers * components, components
    assert h["layer"]["p_value"] <= 2 * max(layers / math.comb(n, c),
                                            1 / (hierarchy.PERMUTATIONS + 1))
    assert hierarchy.row(h)["verdict"] == "PASS"


def test_densities_are_each_matrixs_mean_score():
    matrices = [LogicalMatrix("w", 0, "attn.q", rows=torch.tensor([0, 1])),
                LogicalMatrix("w", 0, "attn.k", rows=torch.tensor([2]))]
    scores = {"w": torch.tensor([[1.0, 3.0], [5.0, 7.0], [100.0, 0.0]])}
    got = [d["density"] for d in hierarchy.densities(scores, matrices)]
    assert got == [pytest.approx(4.0), pytest.approx(50.0)]


def test_one_layer_and_one_component_is_a_skip():
    matrices, scores = model_scores(1, 1, (4, 4), seed=0)
    h = hierarchy.judge(hierarchy.densities(scores, matrices))
    assert h["hierarchical"] is None and hierarchy.row(h)["verdict"] == "SKIP"
