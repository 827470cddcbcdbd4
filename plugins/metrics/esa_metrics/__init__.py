"""ESA's built-in sensitivity metrics, registered through the `esa` entry-point group."""

from esa_core import hookimpl
from esa_metrics.act_mag import ActMag
from esa_metrics.grad_squared import GradSquared
from esa_metrics.grad_x_weight import GradXWeight
from esa_metrics.hutchinson_diag import HutchinsonDiag
from esa_metrics.magnitude import Magnitude
from esa_metrics.super_weight import SuperWeight


@hookimpl
def register_metrics(register):
    for metric in (GradXWeight, GradSquared, ActMag, HutchinsonDiag, Magnitude, SuperWeight):
        register(metric)
