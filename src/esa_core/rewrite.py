"""Model-wide changes: a rule rewrites every scored matrix except its kept weights, then is undone.

Quantizing a model changes every weight, so undoing it needs every original value. Rather than a
second copy of the model, the originals are written to disk once, one matrix at a time, before
the first change (`Originals`), and read back one matrix at a time after each: at most one
matrix's original values sit beside the model, on the device that matrix lives on, and there is
never a second copy of the model on the accelerator or the host. A checksum of every touched
parameter, against the unchanged model's, proves each restore bit-exact.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esa_core.api import LogicalMatrix, Perturbation
from esa_core.errors import EsaError, PluginFailure
from esa_core.guards import plugin_call
from esa_core.perturbation import RestoreError, checksum
from esa_core.resume import FREE_SPACE_MARGIN, human_bytes
from esa_core.selection import Picks, Selection, matrix_size


def original_bytes(matrices: Sequence[LogicalMatrix], params: Mapping[str, nn.Parameter]) -> int:
    """Disk the originals of `matrices` take (their values in the model's dtype)."""
    return sum(matrix_size(m, params[m.param].shape) * params[m.param].element_size()
               for m in matrices)


def check_room(folder: Path, nbytes: int) -> None:
    """Refuse, in one line, a disk that cannot hold `nbytes` of originals beside the results."""
    existing = next(p for p in [folder, *folder.absolute().parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < nbytes + FREE_SPACE_MARGIN:
        raise EsaError(f"--protect keeps the original values of the scored weights on disk while "
                       f"the model is changed: it needs {human_bytes(nbytes + FREE_SPACE_MARGIN)}"
                       f" free under {existing}, which has {human_bytes(free)}; free some space "
                       "or narrow the scored weights with --include/--exclude.")


class Originals:
    """The unchanged values of the scored matrices, one safetensors file per matrix in `folder`."""

    def __init__(self, folder: Path, matrices: Sequence[LogicalMatrix],
                 params: Mapping[str, nn.Parameter]) -> None:
        self.folder = folder
        self.matrices = list(matrices)
        self.params = params

    def _path(self, i: int) -> Path:
        return self.folder / f"{i}.safetensors"

    def save(self) -> None:
        """Write every matrix's current values (call on the unchanged model), one at a time."""
        from safetensors.torch import save_file

        self.remove()  # a stopped run's files are never trusted
        check_room(self.folder, original_bytes(self.matrices, self.params))
        self.folder.mkdir(parents=True)
        for i, m in enumerate(self.matrices):
            values = m.view(self.params[m.param].detach()).contiguous().cpu()
            save_file({"values": values}, str(self._path(i)))

    def restore(self, i: int) -> None:
        """Write matrix `i`'s original values back into its parameter."""
        from safetensors.torch import load_file

        m = self.matrices[i]
        param = self.params[m.param].detach()
        m.assign(param, load_file(str(self._path(i)), device=str(param.device))["values"])

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def keep_mask(matrix: LogicalMatrix, param: torch.Tensor, picks: Picks | None) -> torch.Tensor:
    """A bool tensor shaped like `matrix.view(param)`, True at the picked weights."""
    mask = torch.zeros(param.shape[-2:], dtype=torch.bool, device=param.device)
    if picks is not None:
        mask[picks.rows.to(param.device), picks.cols.to(param.device)] = True
    return mask if matrix.rows is None else mask.index_select(0, matrix.rows.to(param.device))


@contextmanager
def rewritten(originals: Originals, rule: Perturbation, kept: Selection,
              generator: torch.Generator, pristine: dict[int, int]) -> Iterator[dict[str, int]]:
    """Every matrix of `originals` changed by `rule` except the `kept` weights, for the `with`
    body; yield the summed facts; restore exactly.

    `pristine` caches the unchanged parameters' checksums by id (shared with every other change
    on the bench). Raises PluginFailure when the rule changes a kept weight or returns the
    wrong shape, RestoreError when a restored parameter's checksum differs.
    """
    params = originals.params
    owners = list({id(params[m.param]): params[m.param] for m in originals.matrices}.values())
    missing = [p for p in owners if id(p) not in pristine]
    pristine.update(zip(map(id, missing), checksum(missing)))
    picks = {id(p.matrix): p for p in kept.picks}
    facts: dict[str, int] = {}
    try:
        for m in originals.matrices:
            param = params[m.param].detach()
            current = m.view(param)
            keep = keep_mask(m, param, picks.get(id(m)))
            new, found = plugin_call(f"perturbation '{rule.name}' failed", rule.perturb_matrix,
                                     current, keep, generator)
            _check(rule, m, new, current, keep)
            m.assign(param, new)
            for key, value in found.items():
                facts[key] = facts.get(key, 0) + value
        yield facts
    finally:
        for i in range(len(originals.matrices)):
            originals.restore(i)
        if checksum(owners) != [pristine[id(p)] for p in owners]:
            raise RestoreError(f"the weights changed by '{rule.name}' did not return "
                               "bit-exactly (checksum differs after restoring).")


def _check(rule: Perturbation, matrix: LogicalMatrix, new: Any, current: torch.Tensor,
           keep: torch.Tensor) -> None:
    if not isinstance(new, torch.Tensor) or new.shape != current.shape \
            or new.dtype != current.dtype:
        got = f"{new.dtype} {tuple(new.shape)}" if isinstance(new, torch.Tensor) else type(new)
        raise PluginFailure(f"perturbation '{rule.name}' returned {got} for the matrix "
                            f"{matrix.key} ({current.dtype} {tuple(current.shape)}).")
    if not torch.equal(new[keep], current[keep]):
        raise PluginFailure(f"perturbation '{rule.name}' changed kept weights of {matrix.key}; "
                            "perturb_matrix must return them unchanged.")
