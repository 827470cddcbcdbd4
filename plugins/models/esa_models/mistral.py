"""Mistral (Mistral-7B v0.1-v0.3): Llama's layout and names, sliding-window attention aside."""

from esa_models.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    """Mistral: the same module names as Llama, claimed under its own model_type."""

    name = "mistral"
    model_types = ("mistral",)
