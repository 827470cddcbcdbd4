"""Any causal LM: every 2-D weight inside the blocks; the component guessed from common names.

The generic adapter never splits a fused tensor: it cannot know a family's layout, and a wrong
split would mislabel weights. A fused tensor (GPT-2's `c_attn`, Falcon's `query_key_value`, ...)
is one matrix of component `other`, and so is each expert's slice of a fused 3-D expert tensor
(Qwen2-MoE, OLMoE: `experts.gate_up_proj`, `experts.down_proj`). CSV row/col still index the
real parameter, so for a GPT-2 `Conv1D`, which stores its weight as [in, out], the row is the
input feature and the column the output unit (the transpose of nn.Linear's [out, in]).
"""

from torch import nn

from esa_core.api import ActivationCallback, ModelAdapter, ScoredParam
from esa_core.errors import EsaError

GUESSES = (
    (("q_proj", "query", "wq", "q_lin"), "attn.q"),
    (("k_proj", "key", "wk", "k_lin"), "attn.k"),
    (("v_proj", "value", "wv", "v_lin"), "attn.v"),
    (("o_proj", "out_proj", "dense", "wo", "attn.c_proj", "out_lin"), "attn.o"),
    (("gate_proj", "w1"), "mlp.gate"),
    (("up_proj", "fc1", "c_fc", "w3", "dense_h_to_4h", "fc_in"), "mlp.up"),
    (("down_proj", "fc2", "mlp.c_proj", "w2", "dense_4h_to_h", "fc_out"), "mlp.down"),
)


class GenericAdapter(ModelAdapter):
    """Fallback for any causal LM: the blocks' weights (per expert if 3-D), `other` when unsure."""

    name = "generic"
    fallback = True

    def component_of(self, name: str, model: nn.Module) -> str | None:
        match = self.layer_pattern.search(name)
        if not match:
            return self.outside_component(name, model)
        stem = name.removesuffix(".weight")
        if stem == name:
            # a 3-D tensor without `.weight` is a transformers-5 fused expert tensor
            # (`experts.gate_up_proj`): scored one matrix per expert, as `other`
            return "other" if model.get_parameter(name).dim() == 3 else None
        leaf = stem[match.end():]
        for suffixes, component in GUESSES:  # whole name segments: `query_key_value` != `value`
            if any(leaf == s or leaf.endswith(f".{s}") for s in suffixes):
                return component
        return "other"

    def register_activation_hook(self, scored: ScoredParam, callback: ActivationCallback):
        """As for nn.Linear; refused for [in, out] weights, which activation metrics misread."""
        from transformers.pytorch_utils import Conv1D

        if isinstance(scored.module, Conv1D):
            raise EsaError(
                f"{scored.name} is a Conv1D weight stored as [in, out]; activation metrics "
                "expect [out, in]. Use a gradient metric for this model.")
        return super().register_activation_hook(scored, callback)
