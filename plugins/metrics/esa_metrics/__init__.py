"""ESA's built-in sensitivity metrics, registered through the `esa` entry-point group."""

from esa_core import hookimpl
from esa_metrics.grad_x_weight import GradXWeight


@hookimpl
def register_metrics(register):
    register(GradXWeight)
