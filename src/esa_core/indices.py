"""Index arithmetic that holds at any size: int64 integers, never a float position.

float32 holds integers exactly only up to 2^24 = 16,777,216, so `linspace(0, n - 1, m)` in
float32 rounds `n - 1` up to `n` for one 58.7M-element MLP matrix of an 8B model (an index out
of bounds); int32 ends at 2^31, below a 7B model's count of weights. Here every position is
computed in int64 from integers alone.
"""

from __future__ import annotations

import torch


def evenly_spaced(n: int, count: int) -> torch.Tensor:
    """`count` int64 indices spread evenly over 0..n-1, the first and the last included.

    Index i is i (n - 1) / (count - 1) rounded to the nearest integer (a tie to the even one,
    as `torch.round` does), computed exactly; for any n below 2^62 / count.
    """
    i = torch.arange(count, dtype=torch.int64)
    steps = max(count - 1, 1)
    numerator = i * (n - 1)
    low = numerator // steps
    twice_rest = 2 * (numerator - low * steps)
    up = (twice_rest > steps) | ((twice_rest == steps) & (low % 2 == 1))
    return low + up.long()
