"""ESA's built-in model adapters, registered through the `esa` entry-point group."""

from esa_core import hookimpl
from esa_models.generic import GenericAdapter
from esa_models.gpt_neox import GPTNeoXAdapter
from esa_models.llama import LlamaAdapter
from esa_models.mistral import MistralAdapter
from esa_models.mixtral import MixtralAdapter
from esa_models.phi3 import Phi3Adapter


@hookimpl
def register_model_adapters(register):
    for adapter in (LlamaAdapter, MistralAdapter, Phi3Adapter, MixtralAdapter, GPTNeoXAdapter,
                    GenericAdapter):
        register(adapter)
