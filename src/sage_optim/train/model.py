"""Build the Llama model of a run (``transformers.LlamaForCausalLM``: RMSNorm, SwiGLU, RoPE)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .config import ModelConfig

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM

__all__ = ["round_vocab", "llama_config", "build_model", "build_meta_model", "count_params"]

VOCAB_MULTIPLE = 64


def round_vocab(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round a tokenizer's vocabulary up to a multiple of ``multiple`` (faster matmuls; unused rows never train)."""
    return -(-vocab_size // multiple) * multiple


def llama_config(model: ModelConfig, *, vocab_size: int, max_seq_len: int) -> "LlamaConfig":
    """The Hugging Face config for ``model`` with an embedding table of ``vocab_size`` rows."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=model.num_heads,
        num_key_value_heads=model.num_kv_heads,
        max_position_embeddings=max_seq_len,
        rms_norm_eps=model.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": model.rope_theta},
        initializer_range=model.init_std,
        tie_word_embeddings=model.tie_word_embeddings,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(model: ModelConfig, *, vocab_size: int, max_seq_len: int,
                device: torch.device | str = "cpu") -> "LlamaForCausalLM":
    """A freshly initialised LlamaForCausalLM in float32 (weights are seeded by the caller's torch RNG)."""
    from transformers import LlamaForCausalLM

    config = llama_config(model, vocab_size=vocab_size, max_seq_len=max_seq_len)
    net = LlamaForCausalLM(config)
    return net.to(device=device, dtype=torch.float32)


def build_meta_model(model: ModelConfig, *, vocab_size: int, max_seq_len: int) -> "LlamaForCausalLM":
    """The same model on the meta device: shapes and dtypes without memory (for state accounting)."""
    from transformers import LlamaForCausalLM

    config = llama_config(model, vocab_size=vocab_size, max_seq_len=max_seq_len)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def count_params(module: nn.Module) -> int:
    """Number of distinct parameters (a tied embedding/head counts once)."""
    return sum(p.numel() for p in module.parameters())
