"""Llama family (Llama 2/3, SmolLM, TinyLlama): separate q/k/v/o and gate/up/down projections."""

from esa_core.api import ModelAdapter

ATTENTION = {
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
}


class LlamaAdapter(ModelAdapter):
    """Llama: model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}."""

    name = "llama"
    model_types = ("llama",)
    components = {
        **ATTENTION,
        "mlp.gate_proj": "mlp.gate",
        "mlp.up_proj": "mlp.up",
        "mlp.down_proj": "mlp.down",
    }
