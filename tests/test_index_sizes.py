"""Index and count arithmetic at the sizes real models have: just past 2^24 elements in one
matrix (float32 stops counting there: an 8B model's MLP matrices hold 58.7M weights) and past
2^31 over a model (int32 stops there: 7B weights). Past 2^31 nothing is allocated: shapes live
on the meta device, scores are stride-0 views, indices are computed, never materialised.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from esa_core.api import LogicalMatrix, ScoredParam
from esa_core.controls import WeightIndex, overlap, random_k
from esa_core.indices import evenly_spaced
from esa_core.perturbation import RestoreError, checksum, generator_for, perturbed
from esa_core.pipeline import csv_rows
from esa_core.selection import Picks, Selection, param_offsets, select, top_k
from esa_core.stability import _keys_scores
from esa_core.stats import _sample, quantiles, weight_histogram

PAST_2_24 = (1 << 24) + 4  # n - 1 = 2^24 + 3 has no float32: linspace rounded it up to n
PAST_2_31 = (1 << 31) + 7
MLP = (14336, 4096)  # Llama-3.1-8B's MLP matrix, 58.7M weights


def exact_spacing(n: int, count: int) -> list[int]:
    """round(i (n-1) / (count-1)), ties to even, in exact rational arithmetic."""
    return [round(Fraction(i * (n - 1), count - 1)) for i in range(count)]


@pytest.mark.parametrize("n", [PAST_2_24, PAST_2_31, 7 * 10**9 + 3, 1 << 40])
def test_evenly_spaced_is_exact_and_ends_on_the_last_index(n):
    got = evenly_spaced(n, 4096)
    assert got.dtype == torch.int64
    assert got.tolist() == exact_spacing(n, 4096)
    assert int(got[-1]) == n - 1


def test_float32_spacing_was_out_of_bounds_past_2_24():
    """The bug this file guards against, shown on its own (nothing of ESA's involved)."""
    assert int(torch.linspace(0, PAST_2_24 - 1, 4096)[-1].long()) == PAST_2_24


def test_the_sample_of_a_matrix_past_2_24_reaches_its_last_weight():
    x = torch.zeros(PAST_2_24)
    x[-1] = 1.0
    sample = _sample(x, 4096)
    assert len(sample) == 4096 and float(sample[-1]) == 1.0


def test_the_sample_of_a_tensor_past_2_31_is_taken_without_allocating_it():
    x = torch.ones(1).expand(PAST_2_31)  # a stride-0 view: 4 bytes of storage
    sample = _sample(x, 4096)
    assert len(sample) == 4096 and bool((sample == 1).all())


def test_quantiles_of_more_than_2_24_values_are_exact():
    x = torch.rand(PAST_2_24 + 1, generator=torch.Generator().manual_seed(0))
    half = (PAST_2_24 + 1 - 1) // 2  # the median's position is an integer here
    assert quantiles(x, [0.5]) == [float(torch.kthvalue(x, half + 1).values)]


def test_histogram_counts_past_2_24_in_one_bin():
    """torch.histc counts in float32: a bin stopped at 16,777,216."""
    w = torch.full((PAST_2_24 + 1,), 0.0123)
    hist = weight_histogram([w])
    assert max(hist["counts"]) == PAST_2_24 + 1 == hist["count"]


def test_histogram_agrees_with_a_count_by_bin():
    """Weights at bin centres (10^-8 .. 10^2 in 0.1-decade bins), plus some outside."""
    g = torch.Generator().manual_seed(1)
    bins = torch.randint(-5, 105, (5000,), generator=g)  # -5..-1 below, 100..104 above
    sign = torch.randint(0, 2, (5000,), generator=g) * 2 - 1
    w = sign * torch.pow(10.0, -8.0 + (bins.double() + 0.5) / 10).float()
    hist = weight_histogram([w[:3000].view(30, 100), w[3000:]])
    assert hist["counts"] == [int((bins == b).sum()) for b in range(100)]
    assert hist["below"] == int((bins < 0).sum()) and hist["above"] == int((bins >= 100).sum())
    assert hist["count"] == 5000


@pytest.mark.parametrize("largest", [True, False])
def test_top_k_of_a_large_tensor_equals_torch_topk(largest):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3 << 20, generator=g)
    x[123] = x[456] = x[789]  # a tie
    for k in (1, 100, 10_001):
        values, idx = top_k(x, k, largest)
        expected = torch.topk(x, k, largest=largest, sorted=True).values
        assert idx.dtype == torch.int64
        assert torch.equal(values, expected) and torch.equal(x[idx], values)
        assert len(set(idx.tolist())) == k


def test_top_k_counts_nan_as_largest_like_torch_topk():
    x = torch.rand(2 << 20, generator=torch.Generator().manual_seed(3))
    x[[5, 2_000_000]] = float("nan")
    values, idx = top_k(x, 3)
    assert values[:2].isnan().all() and set(idx[:2].tolist()) == {5, 2_000_000}


def test_top_k_of_a_matrix_past_2_24_names_its_last_weight():
    scores = torch.rand(MLP, generator=torch.Generator().manual_seed(4))
    scores[-1, -1] = 2.0
    scores[0, 0] = -1.0
    matrix = LogicalMatrix("w", 0, "mlp.down")
    for largest, where in ((True, (MLP[0] - 1, MLP[1] - 1)), (False, (0, 0))):
        picks = select({"w": scores}, [matrix], 5, "per_layer", largest=largest).picks[0]
        assert (int(picks.rows[0]), int(picks.cols[0])) == where
        assert int(picks.flat(scores.shape)[0]) == where[0] * MLP[1] + where[1]


def meta_model(n_params: int, shape=MLP) -> tuple[dict, list[LogicalMatrix]]:
    """`n_params` matrices of `shape` on the meta device: shapes and counts, no storage."""
    params = {f"layers.{i}.mlp.up": torch.nn.Parameter(torch.empty(shape, device="meta"))
              for i in range(n_params)}
    return params, [LogicalMatrix(name, i, "mlp.up") for i, name in enumerate(params)]


def test_flat_indices_of_an_expert_tensor_past_2_31():
    experts, rows, cols = 40, *MLP  # 2.35B weights in one 3-D parameter
    picks = Picks(LogicalMatrix("experts", 0, "moe.up", expert=experts - 1),
                  torch.tensor([rows - 1]), torch.tensor([cols - 1]), torch.ones(1))
    flat = picks.flat(torch.Size((experts, rows, cols)))
    assert flat.dtype == torch.int64 and int(flat[0]) == experts * rows * cols - 1


def test_model_wide_numbering_past_2_31():
    params, matrices = meta_model(40)  # 40 x 58.7M = 2.35B weights
    index = WeightIndex(matrices, params)
    size = MLP[0] * MLP[1]
    assert index.total == 40 * size > 1 << 31
    last = torch.tensor([index.total - 1, 37 * size + 12_345])
    assert index.owner(last).tolist() == [39, 37]
    assert index.global_keys(last).tolist() == [40 * size - 1, 37 * size + 12_345]


def test_global_random_k_past_2_31_is_distinct_disjoint_and_reaches_the_end():
    params, matrices = meta_model(40)
    index = WeightIndex(matrices, params)
    scores = {name: torch.zeros(1, 1).expand(MLP) for name in params}  # stride-0 views
    last = matrices[-1]
    top = Selection([Picks(last, torch.arange(4000) % MLP[0], torch.arange(4000),
                           torch.ones(4000))])
    drawn = random_k(top, index, scores, "global", generator_for(3, "random_k"))
    keys = index.selection_keys(drawn)
    assert len(keys) == 4000 == len(set(keys.tolist()))
    # 8.6 % of the weights lie past 2^31: all 4,000 draws below it has odds 0.914^4000
    assert (1 << 31) < int(keys.max()) < index.total
    assert overlap(drawn, top, index) == 0
    for p in drawn.picks:  # every pick is a real coordinate of its own matrix
        assert int(p.rows.max()) < MLP[0] and int(p.cols.max()) < MLP[1]


def test_stability_keys_past_2_31():
    params, matrices = meta_model(40)
    scored = [ScoredParam(name, p, torch.nn.Identity(), [m])
              for (name, p), m in zip(params.items(), matrices)]
    offsets = param_offsets({s.name: s.param for s in scored})
    size = MLP[0] * MLP[1]
    assert offsets[matrices[-1].param] == 39 * size
    picks = [Picks(matrices[-1], torch.tensor([MLP[0] - 1, 0]), torch.tensor([MLP[1] - 1, 0]),
                   torch.tensor([2.0, 1.0]))]
    keys, _ = _keys_scores(picks, offsets, {name: p.shape for name, p in params.items()})
    assert keys.dtype == np.int64 and keys.tolist() == [40 * size - 1, 39 * size]


def test_top_weights_rows_past_2_31_keep_their_row():
    rows, cols = (1 << 31) // 3 + 5, 3  # one matrix of 2^31 + 6 weights, as a stride-0 view
    weight = torch.full((1, 1), 0.5).expand(rows, cols)
    m = LogicalMatrix("w", 0, "mlp.down")
    selection = Selection([Picks(m, torch.tensor([rows - 1]), torch.tensor([cols - 1]),
                                 torch.tensor([1.0]))])
    row = csv_rows(selection, {"w": weight})[0]
    assert (row["row"], row["col"], row["weight"]) == (rows - 1, cols - 1, "0.5")
    assert int(selection.picks[0].flat(weight.shape)[0]) == rows * cols - 1 > 1 << 31


def test_perturbing_the_last_weight_of_a_matrix_past_2_24(registry):
    param = torch.nn.Parameter(torch.randn(PAST_2_24, generator=torch.Generator().manual_seed(5)))
    before = param.detach().clone()
    matrix = LogicalMatrix("w", 0, "mlp.down")
    last = Picks(matrix, torch.tensor([0]), torch.tensor([PAST_2_24 - 1]), torch.ones(1))
    shaped = {"w": param.view(1, -1)}
    sign_flip = registry.get("perturbation", "sign_flip")()
    with perturbed(Selection([last]), shaped, sign_flip, generator_for(0, "p")):
        assert float(param.detach()[-1]) == -float(before[-1])
        assert torch.equal(param.detach()[:-1], before[:-1])
    assert torch.equal(param.detach(), before)

    class WritesTheLastWeight(type(sign_flip)):
        def perturb(self, values, matrix, generator):
            matrix.view(-1)[-1] += 1.0
            return values, {}

    first = Picks(matrix, torch.tensor([0]), torch.tensor([0]), torch.ones(1))
    with pytest.raises(RestoreError):
        with perturbed(Selection([first]), shaped, WritesTheLastWeight(), torch.Generator()):
            pass


def test_checksum_sees_one_changed_bit_anywhere_at_any_alignment():
    base = torch.randn(1003, generator=torch.Generator().manual_seed(6))
    for start in (0, 1, 2, 3):  # parameters may start at any 4-byte offset of their storage
        part = base[start:]
        ref = checksum([part])
        for i in (0, 1, len(part) // 2, len(part) - 1):
            part.view(torch.int32)[i] ^= 1  # one bit of one weight
            assert checksum([part]) != ref
            part.view(torch.int32)[i] ^= 1
            assert checksum([part]) == ref
