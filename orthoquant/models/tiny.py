"""Tiny random-init models of every supported family, for tests and benchmarks.

Hugging Face's default init (γ = 1, zero biases, std 0.02) hides folding and scaling bugs, so every
norm weight and bias here is randomized and weights are scaled to ~1/√fan_in, giving O(1) activations.
Sizes include non-powers of two (intermediate 96 = 12·8) and GQA (4 query heads, 2 KV heads).
"""
from __future__ import annotations

import math
import types

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from .loading import attention_for

# Every tiny model's vocabulary (tests draw their random token windows below it).
TINY_VOCAB = 101

_COMMON = dict(
    vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0,
)

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], **_COMMON),
    "llama-tied": dict(model_type="llama", architectures=["LlamaForCausalLM"],
                       **{**_COMMON, "tie_word_embeddings": True}),
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=None, **_COMMON),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], **_COMMON),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=16, **_COMMON),
    # Phi-3: fused qkv_proj / gate_up_proj; Phi-4-mini adds partial rotary (3/4 of head_dim) and tied embeddings
    "phi3": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, **_COMMON),
    # Gemma 2 / 3: (1 + γ) norms, sandwich norms, √hidden embeddings, tied; a sliding window shorter than the
    # test windows, a query_pre_attn_scalar ≠ head_dim, soft-capping (Gemma 2), q/k norms (Gemma 3)
    "gemma2": dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=8, layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, **{**_COMMON, "tie_word_embeddings": True}),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], head_dim=16,
                   query_pre_attn_scalar=24, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                   pad_token_id=0, bos_token_id=1, eos_token_id=2, **{**_COMMON, "tie_word_embeddings": True}),
    "phi4-mini": dict(model_type="phi3", architectures=["Phi3ForCausalLM"], pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, partial_rotary_factor=0.75, **{**_COMMON, "tie_word_embeddings": True}),
}
# Families without an ArchSpec, served by the generic path (models/generic.py): GPT-2's Conv1D and
# learned positions, OPT's biased LayerNorms under model.decoder, Phi-1's parallel block (q/k/v and fc1
# read one LayerNorm output) with partial rotary and a biased lm_head.
_SMALL = dict(vocab_size=TINY_VOCAB, max_position_embeddings=256)
GENERIC_CONFIGS: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=TINY_VOCAB, n_positions=256,
                 n_embd=64, n_layer=2, n_head=4, n_inner=96, tie_word_embeddings=True,
                 bos_token_id=0, eos_token_id=0),
    "opt": dict(model_type="opt", architectures=["OPTForCausalLM"], hidden_size=64, ffn_dim=96,
                num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, do_layer_norm_before=True,
                tie_word_embeddings=False, **_SMALL),
    # mixture of experts: 4 experts, top-2 (experts are 3-D parameters in transformers 5, see models/experts.py)
    "qwen3-moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64, intermediate_size=96,
                      moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, **_SMALL),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64, intermediate_size=32,
                    num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, tie_word_embeddings=False, **_SMALL),
    "phi": dict(model_type="phi", architectures=["PhiForCausalLM"], hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5,
                tie_word_embeddings=False, **_SMALL),
}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
GENERIC_FAMILIES = ("gpt2", "opt", "phi")


def tiny_config(name: str, **overrides) -> PretrainedConfig:
    """Config of a tiny model of family ``name`` (a key of :data:`TINY_CONFIGS` or :data:`GENERIC_CONFIGS`)."""
    kwargs = {**(TINY_CONFIGS[name] if name in TINY_CONFIGS else GENERIC_CONFIGS[name]), **overrides}
    model_type = kwargs.pop("model_type")
    return AutoConfig.for_model(model_type, **kwargs)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial value: weights ~ N(0, 1/fan_in), norms ~ U(0.5, 1.5), biases ~ N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in model.named_parameters():
        if p.ndim >= 2:  # 3-D: stacked MoE experts (experts, out, in)
            std = 1.0 if id(p) in embeddings else 1 / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        else:  # norm weights
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def _exact_rmsnorm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    eps = getattr(self, "variance_epsilon", None) or self.eps
    scale = 1 + self.weight if type(self).__name__.startswith("Gemma") else self.weight  # Gemma: (1 + γ)
    return scale * (hidden_states * torch.rsqrt(variance + eps))


def exact_norms_(model: torch.nn.Module) -> torch.nn.Module:
    """Make every RMSNorm compute in its input's dtype.

    Hugging Face's RMSNorm casts to float32 inside, which caps float64 checks at ~1e-7; with this,
    a float64 model is float64 throughout and invariance can be checked to 1e-10.
    """
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_exact_rmsnorm, module)
    return model


def tiny_model(name: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomized tiny model of family ``name`` in eval mode. Qwen2 has q/k/v biases by construction.

    In float64 the RMSNorms compute in float64 too (:func:`exact_norms_`).
    """
    config = tiny_config(name, **overrides)
    torch.manual_seed(seed)  # transformers' own init draws from the global RNG; ours overwrites it all
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention_for(config))
    if config.tie_word_embeddings:
        model.tie_weights()
    randomize_(model, seed)
    if dtype == torch.float64:
        exact_norms_(model)
    return model.eval()
