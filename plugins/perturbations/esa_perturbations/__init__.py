"""ESA's built-in perturbations, registered through the `esa` entry-point group."""

from esa_core import hookimpl


@hookimpl
def register_perturbations(register):
    """No built-in perturbation is registered yet."""
