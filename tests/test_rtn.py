"""rtn against a hand-written loop (and torchao's affine quantizer where it is installed)."""

import numpy as np
import pytest
import torch

F32 = np.float32


def hand_rtn(w: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Weight by weight, in float32 scalars: each group's range from its weights that are not
    kept, widened to hold 0; w' = (clamp(round(w / s) + z, 0, n) - z) * s; kept weights as they
    are; a group with nothing to quantize as it is."""
    n = F32(2**bits - 1)
    rows, cols = w.shape
    size = group_size or cols
    values, kept = w.float().numpy(), keep.numpy()
    out = np.empty_like(values)
    for r in range(rows):
        for g in range(0, cols, size):
            group = range(g, min(g + size, cols))
            free = [F32(values[r, j]) for j in group if not kept[r, j]]
            low, high = min(free + [F32(0)]), max(free + [F32(0)])
            scale = F32((high - low) / n)
            if scale == 0:
                scale = F32(1)
            zero = F32(np.round(F32(-low / scale)))
            for j in group:
                if kept[r, j]:
                    out[r, j] = values[r, j]
                else:
                    q = min(max(F32(np.round(F32(values[r, j] / scale)) + zero), F32(0)), n)
                    out[r, j] = F32((q - zero) * scale)
    return torch.from_numpy(out).to(w.dtype)


def rtn(registry, **options):
    return registry.get("perturbation", "rtn")(**options)


def quantize(registry, w, keep, **options):
    new, facts = rtn(registry, **options).perturb_matrix(w, keep, torch.Generator())
    assert new.dtype == w.dtype and new.shape == w.shape and facts == {}
    return new


@pytest.mark.parametrize("bits,group_size", [(2, 8), (3, 8), (3, 0), (4, 5), (8, 16), (3, 64)])
def test_rtn_equals_the_hand_loop(registry, bits, group_size):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    w = torch.randn(7, 20, generator=gen) * 0.05  # 20 = 2x8 + a short group of 4 at group 8
    keep = torch.rand(7, 20, generator=gen) < 0.1
    new = quantize(registry, w, keep, bits=bits, group_size=group_size)
    assert torch.equal(new, hand_rtn(w, keep, bits, group_size))
    assert torch.equal(new[keep], w[keep])
    # each row holds at most 2^bits distinct values per group: it really is quantized
    size = group_size or 20
    for r in range(7):
        for g in range(0, 20, size):
            free = ~keep[r, g:g + size]
            assert len(new[r, g:g + size][free].unique()) <= 2**bits


def test_bf16_matrices_are_quantized_in_float32_and_rounded_once(registry):
    w = (torch.randn(4, 32, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    keep = torch.zeros(4, 32, dtype=torch.bool)
    keep[1, 3] = True
    assert torch.equal(quantize(registry, w, keep, bits=3, group_size=16),
                       hand_rtn(w, keep, 3, 16))


def test_a_kept_outlier_does_not_set_its_group_range(registry):
    w = torch.tensor([[0.10, -0.20, 0.30, 100.0, 0.05, -0.15, 0.25, 0.12]])
    keep = torch.tensor([[False, False, False, True, False, False, False, False]])
    new = quantize(registry, w, keep, bits=3, group_size=0)
    # by hand: range [-0.2, 0.3], scale 0.5/7, zero round(0.2/scale) = round(2.8) = 3
    scale = np.float32(0.5) / np.float32(7)
    expected = [(np.clip(np.round(np.float32(v) / scale) + 3, 0, 7) - 3) * scale
                for v in w[0].tolist()]
    expected[3] = 100.0
    assert new[0].tolist() == pytest.approx(expected, abs=1e-7)
    assert new[0, 3] == 100.0
    assert (new - w).abs()[~keep].max() <= scale / 2 + 1e-7  # within half a step
    # the same outlier not kept stretches the step to 100.2/7: every small weight rounds to 0
    stretched = quantize(registry, w, torch.zeros_like(keep), bits=3, group_size=0)
    assert stretched[0, 3] == pytest.approx(7 * (100.2 / 7), rel=1e-6)
    assert (stretched[0][~keep[0]] == 0).all()


def test_a_row_or_group_made_only_of_kept_weights_is_left_as_it_is(registry):
    w = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    keep = torch.zeros(3, 16, dtype=torch.bool)
    keep[1] = True  # a whole row
    keep[2, 8:] = True  # the second group of row 2
    for group_size in (0, 8):
        new = quantize(registry, w, keep, bits=2, group_size=group_size)
        assert torch.isfinite(new).all()
        assert torch.equal(new[1], w[1]) and torch.equal(new[2, 8:], w[2, 8:])
        assert torch.equal(new, hand_rtn(w, keep, 2, group_size))
    assert not torch.equal(new[0], w[0])


def test_an_all_zero_group_stays_zero(registry):
    w = torch.zeros(2, 8)
    w[1, :4] = torch.tensor([0.5, -0.5, 0.25, 0.0])
    new = quantize(registry, w, torch.zeros(2, 8, dtype=torch.bool), bits=4, group_size=4)
    assert torch.equal(new[0], w[0]) and torch.equal(new[1, 4:], w[1, 4:])
    assert torch.isfinite(new).all()


def test_rows_are_quantized_in_chunks_like_at_once(registry, monkeypatch):
    from esa_perturbations import rtn as module

    w = torch.randn(9, 24, generator=torch.Generator().manual_seed(3))
    keep = torch.rand(9, 24, generator=torch.Generator().manual_seed(4)) < 0.2
    whole = quantize(registry, w, keep, bits=3, group_size=8)
    monkeypatch.setattr(module, "CHUNK_ELEMENTS", 48)  # two rows a chunk, a short last chunk
    assert torch.equal(quantize(registry, w, keep, bits=3, group_size=8), whole)


def test_options_are_bounded_and_rtn_refuses_to_be_a_selected_weight_rule(registry):
    from esa_core.errors import EsaError

    for bad in ({"bits": 1}, {"bits": 9}, {"group_size": -1}):
        with pytest.raises(EsaError, match="must lie in"):
            rtn(registry, **bad)
    assert not registry.get("perturbation", "rtn").perturbs_selected()
    assert registry.get("perturbation", "sign_flip").perturbs_selected()


@pytest.mark.parametrize("bits,group_size", [(3, 8), (4, 0)])
def test_rtn_agrees_with_torchao_affine_quantization(registry, bits, group_size):
    """torchao's asymmetric mapping also widens the range to hold 0, so a kept weight set to 0
    in its input sets no range: its qparams then equal rtn's with that weight kept."""
    primitives = pytest.importorskip("torchao.quantization.quant_primitives")
    w = torch.randn(6, 24, generator=torch.Generator().manual_seed(bits)) * 0.03
    keep = torch.rand(6, 24, generator=torch.Generator().manual_seed(9)) < 0.15
    block = (1, group_size or 24)
    masked = torch.where(keep, torch.zeros_like(w), w)
    levels = 2**bits - 1
    scale, zero = primitives.choose_qparams_affine(
        masked, primitives.MappingType.ASYMMETRIC, block, torch.uint8, 0, levels,
        eps=torch.finfo(torch.float32).tiny, scale_dtype=torch.float32,
        zero_point_dtype=torch.float32)
    q = primitives.quantize_affine(w, block, scale, zero, torch.uint8, 0, levels)
    expected = primitives.dequantize_affine(q, block, scale, zero, torch.uint8, 0, levels)
    expected = torch.where(keep, w, expected)
    new = quantize(registry, w, keep, bits=bits, group_size=group_size)
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-7)
