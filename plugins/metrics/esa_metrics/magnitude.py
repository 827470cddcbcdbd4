"""magnitude: score(w) = |w|. Data-free: the baseline every data-driven metric must beat."""

from __future__ import annotations

from esa_core.api import Metric


class Magnitude(Metric):
    """|w|: data-free weight magnitude, the baseline the other metrics must beat."""

    name = "magnitude"

    def init_state(self, weight, dtype):
        return ()  # nothing to accumulate (an empty state, also across ranks)

    def finalize(self, state, weight, num_batches):
        return weight.abs()
