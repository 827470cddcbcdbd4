"""per_layer and global top-k equal a brute-force sort of every score."""

import pytest
import torch

from esa_core.api import LogicalMatrix
from esa_core.errors import EsaError
from esa_core.selection import select


def _scores():
    g = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(6, 5, generator=g),          # plain matrix
        "b": torch.rand(9, 4, generator=g),          # fused: rows split 3 ways, interleaved
        "c": torch.rand(3, 4, 5, generator=g),       # 3 experts
    }
    matrices = [LogicalMatrix("a", 0, "attn.o")]
    matrices += [LogicalMatrix("b", 0, comp, rows=torch.arange(i, 9, 3))
                 for i, comp in enumerate(("attn.q", "attn.k", "attn.v"))]
    matrices += [LogicalMatrix("c", 1, "moe.down", expert=e) for e in range(3)]
    return scores, matrices


def _brute_force(scores, matrices, k, mode, largest=True):
    """Every weight as (score, param, expert, row, col), sorted in Python."""
    entries = []
    for m in matrices:
        t = scores[m.param] if m.expert is None else scores[m.param][m.expert]
        rows = m.rows.tolist() if m.rows is not None else range(t.shape[0])
        group = [(float(t[r, c]), m.param, m.expert, r, c) for r in rows for c in range(t.shape[1])]
        entries.append(sorted(group, reverse=largest)[:k] if mode == "per_layer" else group)
    flat = [e for group in entries for e in group]
    if mode == "global":
        flat = sorted(flat, reverse=largest)[:k]
    return {e[1:] for e in flat}, sorted(e[0] for e in flat)


def _as_set(selection):
    got, values = set(), []
    for p in selection.picks:
        for r, c, s in zip(p.rows.tolist(), p.cols.tolist(), p.scores.tolist()):
            got.add((p.matrix.param, p.matrix.expert, r, c))
            values.append(s)
    return got, sorted(values)


@pytest.mark.parametrize("mode", ["per_layer", "global"])
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_selection_equals_brute_force(mode, largest, k):
    scores, matrices = _scores()
    got, got_values = _as_set(select(scores, matrices, k, mode, largest=largest))
    want, want_values = _brute_force(scores, matrices, k, mode, largest)
    assert got == want
    assert got_values == pytest.approx(want_values)


def test_picks_index_the_real_parameter():
    scores, matrices = _scores()
    for p in select(scores, matrices, 4, "per_layer").picks:
        t = scores[p.matrix.param]
        t = t if p.matrix.expert is None else t[p.matrix.expert]
        assert torch.equal(t[p.rows, p.cols], p.scores)
        assert torch.equal(scores[p.matrix.param].reshape(-1)[p.flat(scores[p.matrix.param].shape)],
                           p.scores)


def test_ranked_is_descending():
    scores, matrices = _scores()
    ranked = select(scores, matrices, 5, "global").ranked()
    values = [float(p.scores[i]) for p, i in ranked]
    assert values == sorted(values, reverse=True) and len(values) == 5


def test_topk_larger_than_a_matrix_is_refused_in_per_layer_mode():
    scores, matrices = _scores()
    with pytest.raises(EsaError, match="smallest scored matrix"):
        select(scores, matrices, 13, "per_layer")
