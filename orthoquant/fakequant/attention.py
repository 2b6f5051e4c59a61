"""KV-cache fake-quant and online Q/K transforms through transformers' attention interface.

We register an attention function (scaled-dot-product attention underneath) instead of forking
modeling files. It receives query/key/value after RoPE, shaped (batch, heads, seq, head_dim), and
applies, per attention module: Q/K transforms (R3), then key/value quantizers, then attention.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

ATTENTION_NAME = "orthoquant"
QKOp = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
Op = Callable[[torch.Tensor], torch.Tensor]


def orthoquant_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """SDPA with the module's ``orthoquant_qk`` transforms and ``orthoquant_kv`` quantizers applied."""
    for op in getattr(module, "orthoquant_qk", ()):
        query, key = op(query, key)
    kv = getattr(module, "orthoquant_kv", None)
    if kv is not None:
        key, value = kv[0](key), kv[1](value)
    if kwargs.get("softcap") is not None:  # Gemma 2: SDPA cannot soft-cap, the model's own eager path can
        return _eager(module, query, key, value, _additive(attention_mask, query, key), **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _eager(module: nn.Module, *args, **kwargs):
    return sys.modules[type(module).__module__].eager_attention_forward(module, *args, **kwargs)


def _additive(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The SDPA mask (boolean, True = attend; None = plain causal) as the additive mask eager paths add."""
    if mask is None:
        q, k = query.shape[-2], key.shape[-2]
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)


AttentionInterface.register(ATTENTION_NAME, orthoquant_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def use_orthoquant_attention(model: nn.Module) -> None:
    """Route every attention module of ``model`` through :func:`orthoquant_attention`."""
    model.config._attn_implementation = ATTENTION_NAME
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = ATTENTION_NAME


def set_kv_quantizers(attention: nn.Module, key_op: Op | None, value_op: Op | None) -> None:
    """Quantize keys (post-RoPE) and values of one attention module; None disables."""
    if key_op is None and value_op is None:
        attention.orthoquant_kv = None
        return
    identity = lambda t: t  # noqa: E731
    attention.orthoquant_kv = (key_op or identity, value_op or identity)


def set_qk_transforms(attention: nn.Module, ops: list[QKOp]) -> None:
    """Online transforms of (query, key) after RoPE (e.g. a head-wise Hadamard, R3), in order."""
    attention.orthoquant_qk = tuple(ops)
