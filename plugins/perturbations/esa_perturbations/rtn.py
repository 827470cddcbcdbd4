"""rtn: asymmetric round-to-nearest quantization of a whole matrix, the kept weights excepted.

Each row is cut into groups of `group_size` consecutive weights along the last dimension (the
input dimension of an `nn.Linear` [out, in] weight; 0: the whole row is one group; a row that
`group_size` does not divide ends with a shorter group). A group's range is [min(lo, 0),
max(hi, 0)] of its weights that are not kept, as in GPTQ's and torchao's asymmetric integer
mapping (zero stays exactly representable); with n = 2^bits - 1 levels above the lowest,

    scale = (max - min) / n,  zero = round(-min / scale),
    w' = (clamp(round(w / scale) + zero, 0, n) - zero) * scale.

Kept weights keep their values and take no part in their group's range: an outlier that is kept
no longer stretches the grid of its neighbours (SpQR, SqueezeLLM's dense-and-sparse split). A
group of kept weights only, or of zeros, is left as it is. The arithmetic is float32; the result
is rounded once to the matrix's dtype.
"""

from __future__ import annotations

import torch

from esa_core.api import Option, Perturbation

#: rows quantized at once, bounded so that the float32 temporaries stay near 64 MB
CHUNK_ELEMENTS = 1 << 24


class RoundToNearest(Perturbation):
    """Quantize whole matrices: asymmetric round-to-nearest, `bits` per weight, groups of
    `group_size` along each row (0: whole rows); kept weights are left out of the range."""

    name = "rtn"
    options = (
        Option("bits", int, 4, "bits per weight: 2^bits levels per group", bounds=(2, 8)),
        Option("group_size", int, 0, "weights per group along the input dimension; "
               "0 = a whole row", bounds=(0, 1 << 62)),
    )

    def perturb_matrix(self, matrix, keep, generator):
        rows, cols = matrix.shape
        size = min(self.settings["group_size"] or cols, cols)
        out = torch.empty_like(matrix)
        step = max(1, CHUNK_ELEMENTS // cols)
        for start in range(0, rows, step):
            part = slice(start, start + step)
            out[part] = self._rows(matrix[part], keep[part], size)
        return out, {}

    def _rows(self, w: torch.Tensor, keep: torch.Tensor, size: int) -> torch.Tensor:
        rows, cols = w.shape
        pad = -cols % size
        x = w.float()
        if pad:  # the short last group is padded with kept slots: they set no range
            x = torch.nn.functional.pad(x, (0, pad))
            keep = torch.nn.functional.pad(keep, (0, pad), value=True)
        x, keep = x.view(rows, -1, size), keep.view(rows, -1, size)
        inf = torch.tensor(torch.inf, device=x.device)
        low = torch.where(keep, inf, x).amin(-1, keepdim=True).clamp(max=0.0)
        high = torch.where(keep, -inf, x).amax(-1, keepdim=True).clamp(min=0.0)
        # a group with no weight to quantize has low = +inf and high = -inf, now 0 and 0
        levels = (1 << self.settings["bits"]) - 1
        scale = (high - low) / levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero group: w' = 0
        zero = torch.round(-low / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
        x = torch.where(keep, x, (q - zero) * scale)
        return x.view(rows, -1)[:, :cols].to(w.dtype)
