"""Control sets: weights perturbed exactly like the super set, to show what "critical" adds.

Each control has the super set's size: per_layer, the same count in every matrix; global, the
same total.

- `random_k`: uniform over the scored weights, disjoint from the super set, drawn anew per seed.
  per_layer draws each matrix's count from that matrix; global draws from all scored weights at
  once (numbered matrix after matrix), so a matrix's share follows its size exactly
  (multivariate hypergeometric), with no list of the model's weights ever built.
- `bottom_k`: the lowest-scoring weights (per matrix, or ranked over the whole model).
- `magnitude_k`: the largest |w| (per matrix, or over the whole model): is "sensitive" more
  than "big"? It may overlap the super set; the analysis reports by how much.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from esa_core.api import LogicalMatrix
from esa_core.errors import EsaError, unknown_choice
from esa_core.layout import BOTTOM_K, CONTROLS, MAGNITUDE_K, RANDOM_K
from esa_core.selection import Picks, Selection, param_offsets, select

# Most random integers one rejection round draws (keeps a round's memory small on any model).
MAX_DRAW = 1 << 22


class WeightIndex:
    """Numbers every scored weight once, matrix after matrix, without listing them.

    A weight's `key` (its parameter's offset + its flat index in the parameter) is unique over
    the model, so two sets of picks can be compared whatever matrices they came from.
    """

    def __init__(self, matrices: Sequence[LogicalMatrix], params: Mapping[str, nn.Parameter]):
        self.matrices = list(matrices)
        self.params = params
        self.cols = [params[m.param].shape[-1] for m in self.matrices]
        sizes = [
            (len(m.rows) if m.rows is not None else params[m.param].shape[-2]) * cols
            for m, cols in zip(self.matrices, self.cols)
        ]
        self.sizes = torch.tensor(sizes, dtype=torch.int64)
        self.starts = torch.cumsum(self.sizes, 0) - self.sizes
        self.total = int(self.sizes.sum())
        self.param_offset = param_offsets(
            {name: params[name] for name in dict.fromkeys(m.param for m in self.matrices)})

    def position(self, matrix: LogicalMatrix) -> int:
        return next(i for i, m in enumerate(self.matrices) if m is matrix)

    def picks(self, i: int, local: torch.Tensor, scores: Mapping[str, torch.Tensor]) -> Picks:
        """Picks of matrix `i` from flat indices into its view, with their scores."""
        m = self.matrices[i]
        rows, cols = m.coordinates(local, self.cols[i])
        score = scores[m.param]
        score = score[m.expert] if m.expert is not None else score
        return Picks(m, rows, cols, score[rows.to(score.device), cols.to(score.device)].cpu())

    def keys(self, picks: Picks) -> torch.Tensor:
        return picks.keys(self.param_offset, self.params[picks.matrix.param].shape)

    def local_keys(self, i: int, local: torch.Tensor) -> torch.Tensor:
        """Keys of flat indices into matrix `i`'s view."""
        rows, cols = self.matrices[i].coordinates(local, self.cols[i])
        return self.keys(Picks(self.matrices[i], rows, cols, torch.empty(0)))

    def selection_keys(self, selection: Selection) -> torch.Tensor:
        parts = [self.keys(p) for p in selection.picks]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    def owner(self, index: torch.Tensor) -> torch.Tensor:
        """The matrix of each weight numbered over all matrices (0 .. total-1)."""
        return torch.searchsorted(self.starts, index, right=True) - 1

    def global_keys(self, index: torch.Tensor) -> torch.Tensor:
        """Keys of weights numbered over all matrices."""
        owner = self.owner(index)
        keys = torch.empty_like(index)
        for i in owner.unique().tolist():
            here = owner == i
            keys[here] = self.local_keys(i, index[here] - self.starts[i])
        return keys


class Magnitudes(Mapping):
    """|w| per parameter, computed when asked, one parameter at a time: never a model copy."""

    def __init__(self, params: Mapping[str, nn.Parameter]):
        self.params = params
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, self.params[name].detach().abs())
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.params)

    def __len__(self) -> int:
        return len(self.params)


def sample_distinct(n: int, count: int, keys_of, excluded: torch.Tensor,
                    generator: torch.Generator) -> torch.Tensor:
    """`count` distinct integers, uniform over [0, n), whose keys are not in `excluded`.

    Rejection sampling: draw with replacement, keep each value's first appearance if its key is
    free. The kept values are, in order, a uniform sample without replacement of the free ones.
    """
    free = n - len(excluded)
    if count > free:
        raise EsaError(f"a control set needs {count} weights outside the top-k but only {free} "
                       "are left; use a smaller --topk.")
    chosen = torch.empty(0, dtype=torch.int64)
    chosen_keys = torch.empty(0, dtype=torch.int64)
    while len(chosen) < count:
        need = count - len(chosen)
        size = min(MAX_DRAW, max(16, 2 * need * n // (free - len(chosen))))
        draw = torch.randint(n, (size,), generator=generator)
        unique, inverse = torch.unique(draw, return_inverse=True)
        first = torch.full((len(unique),), size).scatter_reduce(
            0, inverse, torch.arange(size), "amin")
        draw = draw[first.sort().values]
        keys = keys_of(draw)
        ok = ~torch.isin(keys, excluded) & ~torch.isin(keys, chosen_keys)
        chosen = torch.cat([chosen, draw[ok][:need]])
        chosen_keys = torch.cat([chosen_keys, keys[ok][:need]])
    return chosen


def random_k(super_set: Selection, index: WeightIndex, scores: Mapping[str, torch.Tensor],
             mode: str, generator: torch.Generator) -> Selection:
    """Uniform random weights, disjoint from `super_set`, with its per-matrix or total count."""
    excluded = index.selection_keys(super_set)
    if mode == "per_layer":
        picks = []
        for p in super_set.picks:
            i = index.position(p.matrix)
            local = sample_distinct(
                int(index.sizes[i]), len(p),
                lambda local, i=i: index.local_keys(i, local), index.keys(p),
                generator)
            picks.append(index.picks(i, local, scores))
        return Selection(picks)
    drawn = sample_distinct(index.total, len(super_set), index.global_keys, excluded, generator)
    owner = index.owner(drawn)
    return Selection([index.picks(i, drawn[owner == i] - index.starts[i], scores)
                      for i in owner.unique().tolist()])


def control_set(name: str, super_set: Selection, index: WeightIndex,
                scores: Mapping[str, torch.Tensor], k: int, mode: str,
                generator: torch.Generator) -> Selection:
    """The control set `name` for `super_set` (k per matrix in per_layer, k in total in global)."""
    if name == RANDOM_K:
        return random_k(super_set, index, scores, mode, generator)
    if name == BOTTOM_K:
        return select(scores, index.matrices, k, mode, largest=False)
    if name == MAGNITUDE_K:
        return select(Magnitudes(index.params), index.matrices, k, mode)
    raise unknown_choice("control", name, CONTROLS)


def overlap(a: Selection, b: Selection, index: WeightIndex) -> int:
    """How many weights two selections share."""
    return int(torch.isin(index.selection_keys(a), index.selection_keys(b)).sum())
