"""bit_flip: every bit of a weight's stored representation flips with probability `prob`.

The bits are those of the dtype the model was loaded in (bf16, fp16 or fp32), read through an
integer view of the same memory, so a flipped exponent bit really can turn 0.01 into 1e36.
"""

from __future__ import annotations

import torch

from esa_core.api import Option, Perturbation
from esa_core.errors import EsaError

# dtype -> (integer view, mantissa bits, exponent bits); the sign is the top bit.
LAYOUT = {
    torch.float32: (torch.int32, 23, 8),
    torch.bfloat16: (torch.int16, 7, 8),
    torch.float16: (torch.int16, 10, 5),
}


class BitFlip(Perturbation):
    """Flip each stored bit (sign, exponent, mantissa) independently with probability `prob`."""

    name = "bit_flip"
    options = (Option("prob", float, 0.05, "per-bit flip probability (--perturb-prob)",
                      bounds=(0.0, 1.0)),)

    def perturb(self, values, matrix, generator):
        if values.dtype not in LAYOUT:
            raise EsaError(f"bit_flip supports fp32, bf16 and fp16 weights, not {values.dtype}.")
        int_dtype, mantissa, exponent = LAYOUT[values.dtype]
        nbits = mantissa + exponent + 1
        flips = torch.rand((*values.shape, nbits), generator=generator) < self.settings["prob"]
        weights = torch.tensor([1 << b for b in range(nbits)], dtype=torch.int64)
        mask = (flips.to(torch.int64) * weights).sum(-1)
        # wrap the unsigned mask into the signed integer type of the same width
        mask = torch.where(mask >= 1 << (nbits - 1), mask - (1 << nbits), mask).to(int_dtype)
        new = (values.contiguous().view(int_dtype) ^ mask.to(values.device)).view(values.dtype)
        per_bit = flips.reshape(-1, nbits).sum(0)
        facts = {
            "bits_flipped": int(per_bit.sum()),
            "sign_bits": int(per_bit[nbits - 1]),
            "exponent_bits": int(per_bit[mantissa:nbits - 1].sum()),
            "mantissa_bits": int(per_bit[:mantissa].sum()),
            "weights_changed": int(flips.any(-1).sum()),
            "nonfinite_weights": int((~torch.isfinite(new)).sum()),
        }
        return new, facts
