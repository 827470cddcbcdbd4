"""GPT-NeoX (Pythia): `query_key_value` interleaved per head, then a plain 4h MLP."""

import torch
from torch import nn

from esa_core.api import LogicalMatrix, ModelAdapter
from esa_models.fused import head_dim, split_rows

QKV = "fused.qkv"


def interleaved_qkv(heads: int, d: int) -> list[tuple[str, torch.Tensor]]:
    """Rows of q, k and v when the output is laid out [h0 q, h0 k, h0 v, h1 q, ...].

    GPTNeoXAttention views the projection's output as (heads, 3 * head_size) and chunks the
    last axis in three, so head h's q is rows h*3d .. h*3d+d, its k the next d, its v the next.
    """
    base = torch.arange(heads)[:, None] * 3 * d + torch.arange(d)[None, :]
    return [(c, (base + i * d).reshape(-1)) for i, c in enumerate(("attn.q", "attn.k", "attn.v"))]


class GPTNeoXAdapter(ModelAdapter):
    """Pythia / GPT-NeoX: gpt_neox.layers.N.{attention.{query_key_value,dense}, mlp.*}."""

    name = "gpt_neox"
    model_types = ("gpt_neox",)
    components = {
        "attention.query_key_value": QKV,
        "attention.dense": "attn.o",
        "mlp.dense_h_to_4h": "mlp.up",
        "mlp.dense_4h_to_h": "mlp.down",
    }

    def matrices(self, name: str, param: nn.Parameter, component: str,
                 model: nn.Module) -> list[LogicalMatrix]:
        if component == QKV:
            config = model.config
            parts = interleaved_qkv(config.num_attention_heads, head_dim(config))
            return split_rows(name, param, self.layer_of(name), parts)
        return super().matrices(name, param, component, model)
