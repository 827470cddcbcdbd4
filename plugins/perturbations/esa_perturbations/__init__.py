"""ESA's built-in perturbations, registered through the `esa` entry-point group."""

from esa_core import hookimpl
from esa_perturbations.bit_flip import BitFlip
from esa_perturbations.gauss_noise import GaussNoise
from esa_perturbations.rtn import RoundToNearest
from esa_perturbations.sign_flip import SignFlip
from esa_perturbations.zero import Zero


@hookimpl
def register_perturbations(register):
    for cls in (SignFlip, GaussNoise, BitFlip, Zero, RoundToNearest):
        register(cls)
