"""Tiny models and tokenizers built in-process: no download, a few seconds to make."""

from __future__ import annotations

from functools import cache
from importlib import resources
from pathlib import Path

import torch

VOCAB = 384


@cache
def wikitext_sample(chars: int = 200_000) -> str:
    folder = resources.files("esa_core") / "assets" / "wikitext-2"
    return (folder / "valid.txt").read_text(encoding="utf-8")[:chars]


@cache
def tokenizer():
    """A byte-level BPE tokenizer trained on a slice of the bundled WikiText-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(wikitext_sample().splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             tie_word_embeddings=False)
FAMILIES = {
    "llama": ("LlamaConfig", SHAPE),
    "mistral": ("MistralConfig", SHAPE),
    "qwen2": ("Qwen2Config", SHAPE),
    "phi3": ("Phi3Config", {**SHAPE, "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}),
    "mixtral": ("MixtralConfig", {**SHAPE, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {**SHAPE, "num_experts": 4, "num_experts_per_tok": 2,
                                     "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 64}),
    "gpt_neox": ("GPTNeoXConfig", {k: v for k, v in SHAPE.items() if k != "num_key_value_heads"}),
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                n_positions=256, tie_word_embeddings=False)),
}


def family_config(family: str, **overrides):
    """A tiny config of one family (hidden 32, 2 layers, 4 heads, grouped kv where it has it)."""
    import transformers

    cls, settings = FAMILIES[family]
    return getattr(transformers, cls)(**{**settings, **overrides})


def llama_config(**overrides):
    return family_config("llama", **overrides)


def build(config, seed: int = 0):
    """A causal LM from `config` with deterministic random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save(config, folder: Path, seed: int = 0) -> Path:
    """Save a tiny model and the tiny tokenizer as a Hugging Face folder."""
    build(config, seed).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def blocks(n: int, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    ids = tokenizer()(wikitext_sample(), add_special_tokens=False)["input_ids"]
    whole = torch.tensor(ids[: (len(ids) // seq_len) * seq_len]).view(-1, seq_len)
    pick = torch.randperm(len(whole), generator=torch.Generator().manual_seed(seed))[:n]
    return whole[pick]
