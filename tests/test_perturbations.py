"""Perturbations, control sets and exact restore, against independent computations."""

import struct

import pytest
import tiny
import torch

from esa_core.api import LogicalMatrix, Perturbation
from esa_core.controls import Magnitudes, WeightIndex, control_set
from esa_core.perturbation import RestoreError, generator_for, perturbed
from esa_core.selection import Selection, select

# ----------------------------------------------------------------------------- the rules


def rule(registry, name: str, **options) -> Perturbation:
    return registry.get("perturbation", name)(**options)


def test_all_four_are_registered_with_their_rule_in_the_help(registry):
    entries = {e.name: e for e in registry.entries if e.kind == "perturbation"}
    assert set(entries) >= {"sign_flip", "gauss_noise", "bit_flip", "zero"}
    assert "std" in entries["gauss_noise"].description


@pytest.mark.parametrize("scale", [1.0, 0.5, 3.0])
def test_sign_flip_is_minus_scale_times_w(registry, scale):
    values = torch.tensor([0.5, -1.25, 3.0, 0.0])
    new, _ = rule(registry, "sign_flip", scale=scale).perturb(values, values, torch.Generator())
    assert new.tolist() == [-scale * v for v in values.tolist()]


def test_zero_is_zero(registry):
    values = torch.tensor([0.5, -1.25, 3.0], dtype=torch.bfloat16)
    new, _ = rule(registry, "zero").perturb(values, values, torch.Generator())
    assert new.dtype == torch.bfloat16 and new.tolist() == [0.0, 0.0, 0.0]


def test_gauss_noise_sigma_is_scale_times_the_matrix_std(registry):
    matrix = torch.randn(64, 80, generator=torch.Generator().manual_seed(1)) * 0.3 + 0.1
    values = matrix.reshape(-1)[:4000].clone()
    sigma = 0.02 * float(matrix.double().numpy().std())  # numpy: population std
    new, _ = rule(registry, "gauss_noise", scale=0.02).perturb(
        values, matrix, torch.Generator().manual_seed(7))
    noise = torch.randn(4000, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(new, values + noise * sigma, rtol=0, atol=1e-7)
    assert abs(float((new - values).std()) / sigma - 1) < 0.05


EXPONENT_BITS = {torch.float32: 8, torch.bfloat16: 8, torch.float16: 5}


def stored_words(t: torch.Tensor) -> list[str]:
    """Each element's stored bits, most significant first, read from the raw little-endian bytes
    (not through floats, which would canonicalise NaN payloads)."""
    size = t.element_size()
    raw = t.contiguous().view(torch.uint8).numpy().tobytes()
    fmt = {2: "<H", 4: "<I"}[size]
    return [format(struct.unpack(fmt, raw[i:i + size])[0], f"0{8 * size}b")
            for i in range(0, len(raw), size)]


def fields(word: str, dtype: torch.dtype) -> tuple[str, str, str]:
    """(sign, exponent, mantissa) of a stored word."""
    e = EXPONENT_BITS[dtype]
    return word[0], word[1:1 + e], word[1 + e:]


def test_stored_words_agree_with_the_ieee_encoding():
    assert stored_words(torch.tensor([-2.0])) == [format(struct.unpack(">I", struct.pack(
        ">f", -2.0))[0], "032b")]
    assert fields(stored_words(torch.tensor([1.0], dtype=torch.bfloat16))[0],
                  torch.bfloat16) == ("0", "01111111", "0000000")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_flip_accounting_matches_a_bit_by_bit_count(registry, dtype):
    values = (torch.randn(3000, generator=torch.Generator().manual_seed(2)) * 0.05).to(dtype)
    new, facts = rule(registry, "bit_flip", prob=0.05).perturb(
        values, values, torch.Generator().manual_seed(11))
    counts = {"sign_bits": 0, "exponent_bits": 0, "mantissa_bits": 0}
    changed = nonfinite = 0
    for before, after in zip(stored_words(values), stored_words(new)):
        diffs = [sum(a != b for a, b in zip(x, y))
                 for x, y in zip(fields(before, dtype), fields(after, dtype))]
        for key, d in zip(counts, diffs):
            counts[key] += d
        changed += any(diffs)
        nonfinite += fields(after, dtype)[1] == "1" * EXPONENT_BITS[dtype]
    assert {k: facts[k] for k in counts} == counts
    assert facts["bits_flipped"] == sum(counts.values())
    assert facts["weights_changed"] == changed and facts["nonfinite_weights"] == nonfinite
    nbits = torch.finfo(dtype).bits
    expected = 0.05 * 3000 * nbits  # binomial: within 5 standard deviations
    assert abs(facts["bits_flipped"] - expected) < 5 * (expected * 0.95) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bit_flip_with_prob_one_inverts_every_bit_and_zero_none(registry, dtype):
    values = torch.tensor([0.5, -1.25, 3.0e-3], dtype=dtype)
    same, facts = rule(registry, "bit_flip", prob=0.0).perturb(values, values, torch.Generator())
    assert torch.equal(same, values) and facts["bits_flipped"] == 0
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16}[dtype]
    inverted, facts = rule(registry, "bit_flip", prob=1.0).perturb(values, values,
                                                                   torch.Generator())
    assert torch.equal(inverted.view(ints), ~values.view(ints))
    assert facts["sign_bits"] == 3 and facts["bits_flipped"] == 3 * torch.finfo(dtype).bits


# ----------------------------------------------------------------------------- apply, restore


@pytest.fixture
def model_parts(registry):
    model = tiny.build(tiny.llama_config())
    adapter = registry.get("model adapter", "llama")()
    scored = adapter.scored_params(model)
    params = {s.name: s.param for s in scored}
    matrices = [m for s in scored for m in s.matrices]
    scores = {name: torch.rand(p.shape, generator=torch.Generator().manual_seed(i))
              for i, (name, p) in enumerate(params.items())}
    return model, params, matrices, scores


@pytest.mark.parametrize("name", ["sign_flip", "gauss_noise", "bit_flip", "zero"])
def test_perturbed_changes_only_the_selection_and_restores_bit_exactly(registry, model_parts,
                                                                       name):
    model, params, matrices, scores = model_parts
    before = {n: p.detach().clone() for n, p in params.items()}
    chosen = select(scores, matrices, 7, "per_layer")
    mask = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params.items()}
    for picks in chosen.picks:
        mask[picks.matrix.param].view(-1)[picks.flat(params[picks.matrix.param].shape)] = True
    options = {"bit_flip": {"prob": 0.3}}.get(name, {})
    with perturbed(chosen, params, rule(registry, name, **options), generator_for(5, "perturb")):
        for n, p in params.items():
            assert torch.equal(p.detach()[~mask[n]], before[n][~mask[n]])
        changed = sum(int((p.detach() != before[n]).sum()) for n, p in params.items())
        assert changed > 0.9 * len(chosen)
        if name == "sign_flip":
            for n, p in params.items():
                assert torch.equal(p.detach()[mask[n]], -before[n][mask[n]])
    for n, p in params.items():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32))


def test_a_rule_that_writes_outside_its_selection_is_caught(model_parts):
    model, params, matrices, scores = model_parts

    class Rogue(Perturbation):
        name = "rogue"

        def perturb(self, values, matrix, generator):
            matrix.view(-1)[-1] += 1.0  # not one of the selected weights
            return values, {}

    chosen = select(scores, matrices, 1, "per_layer")
    with pytest.raises(RestoreError):
        with perturbed(chosen, params, Rogue(), torch.Generator()):
            pass


def test_the_study_checksum_cache_still_catches_a_rogue_rule(registry, model_parts):
    """The cache of unperturbed checksums saves work across conditions, never a check."""
    model, params, matrices, scores = model_parts

    class Rogue(Perturbation):
        name = "rogue"

        def perturb(self, values, matrix, generator):
            matrix.view(-1)[-1] += 1.0
            return values, {}

    pristine: dict[int, int] = {}
    chosen = select(scores, matrices, 2, "per_layer")
    with perturbed(chosen, params, rule(registry, "sign_flip"), torch.Generator(), pristine):
        pass
    assert set(pristine) == {id(p) for p in params.values()}
    with pytest.raises(RestoreError):
        with perturbed(chosen, params, Rogue(), torch.Generator(), pristine):
            pass


# ----------------------------------------------------------------------------- control sets


def coordinates(selection: Selection, params) -> list[tuple[str, int]]:
    return [(p.matrix.param, int(i)) for p in selection.picks
            for i in p.flat(params[p.matrix.param].shape)]


def test_random_k_per_layer_matches_counts_is_disjoint_and_new_per_seed(model_parts):
    model, params, matrices, scores = model_parts
    index = WeightIndex(matrices, params)
    top = select(scores, matrices, 40, "per_layer")
    draws = [control_set("random_k", top, index, scores, 40, "per_layer", generator_for(s, "r"))
             for s in (1, 2)]
    top_coords = set(coordinates(top, params))
    for draw in draws:
        assert [(p.matrix, len(p)) for p in draw.picks] == [(p.matrix, len(p)) for p in top.picks]
        coords = coordinates(draw, params)
        assert len(set(coords)) == len(coords) and not set(coords) & top_coords
        for p in draw.picks:  # the scores carried are the weights' own
            assert torch.equal(p.scores, scores[p.matrix.param][p.rows, p.cols])
    assert set(coordinates(draws[0], params)) != set(coordinates(draws[1], params))
    again = control_set("random_k", top, index, scores, 40, "per_layer", generator_for(1, "r"))
    assert coordinates(again, params) == coordinates(draws[0], params)


def test_random_k_stays_inside_fused_row_blocks():
    param = torch.nn.Parameter(torch.arange(48.0).view(12, 4))
    rows = [torch.tensor([0, 3, 6, 9]), torch.tensor([1, 4, 7, 10, 2, 5, 8, 11])]
    matrices = [LogicalMatrix("w", 0, c, rows=r) for c, r in zip(("attn.q", "attn.k"), rows)]
    params, scores = {"w": param}, {"w": param.detach().clone()}
    index = WeightIndex(matrices, params)
    top = select(scores, matrices, 5, "per_layer")
    draw = control_set("random_k", top, index, scores, 5, "per_layer", generator_for(0, "r"))
    for p, own_rows in zip(draw.picks, rows):
        assert set(p.rows.tolist()) <= set(own_rows.tolist())
    # the first block has 16 weights: with 8 on top, the 8 drawn must be exactly the others
    first = [matrices[0]]
    top8 = select(scores, first, 8, "per_layer")
    rest = control_set("random_k", top8, WeightIndex(first, params), scores, 8, "per_layer",
                       generator_for(0, "r"))
    every = {(r, c) for r in rows[0].tolist() for c in range(4)}
    pairs = lambda sel: {(r, c) for p in sel.picks  # noqa: E731
                         for r, c in zip(p.rows.tolist(), p.cols.tolist())}
    assert pairs(rest) == every - pairs(top8) and len(pairs(rest)) == 8


def test_random_k_global_total_disjoint_and_spread_by_matrix_size(model_parts):
    model, params, matrices, scores = model_parts
    index = WeightIndex(matrices, params)
    top = select(scores, matrices, 300, "global")
    draw = control_set("random_k", top, index, scores, 300, "global", generator_for(3, "r"))
    coords = coordinates(draw, params)
    assert len(coords) == 300 == len(set(coords))
    assert not set(coords) & set(coordinates(top, params))
    n = 4000  # a big draw: each matrix's share of it follows its count of free weights
    top = select(scores, matrices, n, "global")
    on_top = {p.matrix.key: len(p) for p in top.picks}
    big = control_set("random_k", top, index, scores, n, "global", generator_for(4, "r"))
    share = {p.matrix.key: len(p) / n for p in big.picks}
    for i, m in enumerate(matrices):
        expected = (int(index.sizes[i]) - on_top.get(m.key, 0)) / (index.total - n)
        assert abs(share.get(m.key, 0.0) - expected) < 5 * (expected / n) ** 0.5


@pytest.mark.parametrize("mode", ["per_layer", "global"])
def test_bottom_k_is_the_lowest_scoring_set(model_parts, mode):
    model, params, matrices, scores = model_parts
    index = WeightIndex(matrices, params)
    k = 30
    bottom = control_set("bottom_k", select(scores, matrices, k, mode), index, scores, k, mode,
                         generator_for(0, "b"))
    picked = {m.key: [] for m in matrices}
    for p in bottom.picks:
        picked[p.matrix.key] += [float(scores[p.matrix.param][r, c])
                                 for r, c in zip(p.rows.tolist(), p.cols.tolist())]
    if mode == "per_layer":
        for m in matrices:  # brute force: every score of the matrix, sorted
            every = sorted(scores[m.param].reshape(-1).tolist())
            assert sorted(picked[m.key]) == every[:k]
    else:
        every = sorted(v for m in matrices for v in scores[m.param].reshape(-1).tolist())
        assert sorted(v for vs in picked.values() for v in vs) == every[:k]


def test_magnitude_k_is_the_largest_absolute_weights(model_parts):
    model, params, matrices, scores = model_parts
    chosen = control_set("magnitude_k", select(scores, matrices, 10, "global"),
                         WeightIndex(matrices, params), scores, 10, "global",
                         generator_for(0, "m"))
    every = sorted((abs(v) for p in params.values() for v in p.detach().reshape(-1).tolist()),
                   reverse=True)
    got = sorted((abs(float(params[p.matrix.param].detach()[r, c])) for p in chosen.picks
                  for r, c in zip(p.rows.tolist(), p.cols.tolist())), reverse=True)
    assert got == every[:10]
    assert set(Magnitudes(params)) == set(params)


def test_control_repeats_need_random_k(registry):
    from esa_core.config import RunConfig
    from esa_core.errors import EsaError

    with pytest.raises(EsaError, match="needs --controls random_k"):
        RunConfig(perturb="zero", controls=["bottom_k"], control_repeats=3).validate(registry)
    with pytest.raises(EsaError, match="unknown control 'random'"):
        RunConfig(perturb="zero", controls=["random"]).validate(registry)
    with pytest.raises(EsaError, match="--controls needs --perturb"):
        RunConfig(controls=["random_k"]).validate(registry)
