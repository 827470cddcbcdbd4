"""Streamed moments: matrix by matrix, merged, equal to the moments of all scores at once."""

from __future__ import annotations

import pytest
import torch

from esa_core.stats import _Moments


def parts() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(300, 70, generator=g).abs().pow(3) * 1e-3 + 5e-3,  # mean >> spread
            torch.rand(50, 9, generator=g),
            torch.randn(1000, 3, generator=g).exp(),                       # heavy tail
            torch.full((4, 4), 2.0)]                                       # no spread at all


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_moments_equal_those_of_all_scores(dtype):
    chunks = [p.to(dtype) for p in parts()]
    moments = _Moments()
    for chunk in chunks:
        moments.add(chunk)
    x = torch.cat([c.reshape(-1) for c in chunks]).double().numpy()
    d = x - x.mean()
    got = moments.summary()
    assert got["count"] == x.size and got["max"] == x.max()
    assert got["mean"] == pytest.approx(x.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(x.std(), rel=1e-6)
    kurtosis = (d**4).mean() / (d**2).mean() ** 2 - 3
    assert got["excess_kurtosis"] == pytest.approx(kurtosis, rel=1e-5)


def test_a_constant_matrix_has_no_kurtosis():
    moments = _Moments()
    moments.add(torch.full((8, 8), 3.0))
    assert moments.summary()["std"] == 0 and moments.summary()["excess_kurtosis"] is None
