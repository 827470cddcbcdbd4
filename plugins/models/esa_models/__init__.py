"""ESA's built-in model adapters, registered through the `esa` entry-point group."""

from esa_core import hookimpl
from esa_models.generic import GenericAdapter
from esa_models.llama import LlamaAdapter


@hookimpl
def register_model_adapters(register):
    register(LlamaAdapter)
    register(GenericAdapter)
