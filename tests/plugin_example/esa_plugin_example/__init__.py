"""An example third-party plugin: adds the `abs_grad` metric to ESA."""

from esa_core import hookimpl
from esa_core.api import GRAD, Metric


class AbsGrad(Metric):
    """|gradient|, mean over batches: how steep the loss is along each weight."""

    name = "abs_grad"
    needs = frozenset({GRAD})

    def on_grad(self, state, weight, grad):
        state.add_(grad.abs().to(state.dtype))


@hookimpl
def register_metrics(register):
    register(AbsGrad)
