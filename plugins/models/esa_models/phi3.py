"""Phi-3: fused `qkv_proj` ([q; k; v] rows) and `gate_up_proj` ([gate; up] rows)."""

from torch import nn

from esa_core.api import LogicalMatrix, ModelAdapter
from esa_models.fused import consecutive, head_dim, split_rows

QKV, GATE_UP = "fused.qkv", "fused.gate_up"


class Phi3Adapter(ModelAdapter):
    """Phi-3: model.layers.N.{self_attn.{qkv,o}_proj, mlp.{gate_up,down}_proj}, split by rows."""

    name = "phi3"
    model_types = ("phi3",)
    components = {
        "self_attn.qkv_proj": QKV,
        "self_attn.o_proj": "attn.o",
        "mlp.gate_up_proj": GATE_UP,
        "mlp.down_proj": "mlp.down",
    }

    def matrices(self, name: str, param: nn.Parameter, component: str,
                 model: nn.Module) -> list[LogicalMatrix]:
        # Phi3Attention slices q = [:heads*d], k = next kv_heads*d, v = the rest;
        # Phi3MLP chunks gate_up_proj's output in two halves, gate first.
        config, layer = model.config, self.layer_of(name)
        if component == QKV:
            d = head_dim(config)
            q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
            return split_rows(name, param, layer,
                              consecutive([("attn.q", q), ("attn.k", kv), ("attn.v", kv)]))
        if component == GATE_UP:
            half = param.shape[0] // 2
            return split_rows(name, param, layer, consecutive([("mlp.gate", half),
                                                               ("mlp.up", half)]))
        return super().matrices(name, param, component, model)
