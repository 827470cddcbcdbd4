"""Top-k selection, per logical matrix (`per_layer`) or over the whole model (`global`).

Global ranking merges each matrix's own top-k candidates: the global top-k is always inside the
union of per-matrix top-k sets, so no tensor of all the model's scores is ever built or sorted.
Within a large matrix, `top_k` first keeps the few candidates past a cut read from a sample:
torch's CPU topk walks a 58.7M-element matrix (one MLP matrix of an 8B model) for seconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from esa_core.api import LogicalMatrix
from esa_core.errors import EsaError
from esa_core.layout import MODES

#: top_k reads its cut from this many scores, and uses the cut above DIRECT_TOPK elements
CUT_SAMPLE, DIRECT_TOPK = 1 << 16, 1 << 20


@dataclass
class Picks:
    """Selected weights of one logical matrix: real coordinates into the parameter and scores."""

    matrix: LogicalMatrix
    rows: torch.Tensor  # rows of the parameter (or of param[expert])
    cols: torch.Tensor
    scores: torch.Tensor

    def __len__(self) -> int:
        return len(self.scores)

    def flat(self, shape: torch.Size) -> torch.Tensor:
        """Flat indices into the parameter (including the expert offset for 3-D tensors)."""
        rows_cols = self.rows * shape[-1] + self.cols
        if self.matrix.expert is None:
            return rows_cols
        return rows_cols + self.matrix.expert * shape[-2] * shape[-1]

    def keys(self, offsets: Mapping[str, int], shape: torch.Size) -> torch.Tensor:
        """Model-wide keys (on the CPU): the parameter's offset (`param_offsets`) plus `flat`,
        so picks of any matrices compare weight by weight."""
        return offsets[self.matrix.param] + self.flat(shape).cpu()


def param_offsets(params: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Where each parameter starts when all of them are laid end to end, in the given order."""
    offsets, start = {}, 0
    for name, param in params.items():
        offsets[name] = start
        start += param.numel()
    return offsets


@dataclass
class Selection:
    """A selected weight set: one Picks per matrix that has any."""

    picks: list[Picks]

    def __len__(self) -> int:
        return sum(len(p) for p in self.picks)

    def ranked(self) -> list[tuple[Picks, int]]:
        """(picks, position) pairs, highest score first; ties broken by matrix order."""
        if not self.picks:
            return []
        scores = torch.cat([p.scores.float().cpu() for p in self.picks])
        owner = torch.cat([torch.full((len(p),), i) for i, p in enumerate(self.picks)])
        position = torch.cat([torch.arange(len(p)) for p in self.picks])
        order = torch.sort(scores, descending=True, stable=True).indices
        return [(self.picks[owner[i]], int(position[i])) for i in order.tolist()]

    def prefix(self, k: int, mode: str) -> Selection:
        """The first `k` of the ranking: each matrix's k highest in per_layer, the k highest
        overall in global (top_weights.csv's order), so that a smaller set is inside a larger."""
        if mode == "per_layer":
            chosen = {id(p): torch.sort(p.scores.float().cpu(), descending=True,
                                        stable=True).indices[:k] for p in self.picks}
        else:
            found: dict[int, list[int]] = {}
            for picks, i in self.ranked()[:k]:
                found.setdefault(id(picks), []).append(i)
            chosen = {key: torch.tensor(sorted(found[key])) for key in found}
        return Selection([_take(p, chosen[id(p)]) for p in self.picks if id(p) in chosen])


def _take(picks: Picks, index: torch.Tensor) -> Picks:
    index = index.to(picks.rows.device)
    return Picks(picks.matrix, picks.rows[index], picks.cols[index],
                 picks.scores[index.to(picks.scores.device)])


def top_k(flat: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(flat, k, largest=largest, sorted=True)` of a 1-D tensor, faster when large.

    A random sample (fixed seed) gives a cut that about 4k of the n values pass; only those
    are ranked. Exact: when fewer than k pass, the whole tensor is ranked instead. NaN counts
    as the largest value, as in torch.topk. Indices are int64.
    """
    n = flat.numel()
    if n <= DIRECT_TOPK or 64 * k > n:
        return torch.topk(flat, k, largest=largest, sorted=True)
    generator = torch.Generator().manual_seed(n)
    sample = flat[torch.randint(n, (CUT_SAMPLE,), generator=generator).to(flat.device)]
    expected = min(CUT_SAMPLE, 4 * k * CUT_SAMPLE // n + 16)
    cut = torch.topk(sample, expected, largest=largest, sorted=True).values[-1]
    keep = flat >= cut if largest else flat <= cut
    if largest:
        keep |= flat.isnan()
    candidates = keep.nonzero().squeeze(1)
    if len(candidates) < k:
        return torch.topk(flat, k, largest=largest, sorted=True)
    values, at = torch.topk(flat[candidates], k, largest=largest, sorted=True)
    return values, candidates[at]


def _top(matrix: LogicalMatrix, score: torch.Tensor, k: int, largest: bool) -> Picks:
    view = matrix.view(score)
    values, flat = top_k(view.reshape(-1), min(k, view.numel()), largest)
    return Picks(matrix, *matrix.coordinates(flat, view.shape[1]), values)


def matrix_size(matrix: LogicalMatrix, shape: torch.Size) -> int:
    """Number of weights in `matrix` of a parameter of `shape` (no tensor is touched)."""
    rows = shape[-2] if matrix.rows is None else len(matrix.rows)
    return rows * shape[-1]


def check_topk(k: int, mode: str, sizes: list[int]) -> None:
    """Refuse a top-k that matrices of these sizes cannot supply (callable before scoring)."""
    if mode not in MODES:
        raise EsaError(f"unknown mode '{mode}'. Valid choices: {', '.join(MODES)}.")
    if mode == "per_layer" and k > min(sizes):
        raise EsaError(f"--topk {k} is larger than the smallest scored matrix ({min(sizes)} "
                       "weights) in per_layer mode.")
    if k > sum(sizes):
        raise EsaError(f"--topk {k} is larger than the number of scored weights ({sum(sizes)}).")


def select(
    scores: Mapping[str, torch.Tensor],
    matrices: Iterable[LogicalMatrix],
    k: int,
    mode: str,
    largest: bool = True,
) -> Selection:
    """The k highest-scoring (or lowest, `largest=False`) weights per matrix or overall."""
    matrices = list(matrices)
    check_topk(k, mode, [matrix_size(m, scores[m.param].shape) for m in matrices])
    if mode == "per_layer":
        return Selection([_top(m, scores[m.param], k, largest) for m in matrices])
    candidates = [_top(m, scores[m.param], k, largest) for m in matrices]
    merged = torch.cat([c.scores.float().cpu() for c in candidates])
    order = torch.topk(merged, k, largest=largest, sorted=True).indices
    owner = torch.cat([torch.full((len(c),), i) for i, c in enumerate(candidates)])
    start = torch.tensor([0] + [len(c) for c in candidates]).cumsum(0)
    chosen: dict[int, list[int]] = {}
    for i in order.tolist():
        o = int(owner[i])
        chosen.setdefault(o, []).append(i - int(start[o]))
    picks = []
    for o in sorted(chosen):
        c, idx = candidates[o], torch.tensor(chosen[o], device=candidates[o].rows.device)
        picks.append(Picks(c.matrix, c.rows[idx], c.cols[idx], c.scores[idx]))
    return Selection(picks)
