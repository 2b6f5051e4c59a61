"""Sites: where activations of a given width flow, who writes and reads them, and how a transform
placed there is fused into weights (float64) and/or run online. The table, not code paths, says
what R1–R4 are:

| site        | width      | fused into                                   | online (at inference)            |
|-------------|------------|----------------------------------------------|----------------------------------|
| residual    | hidden     | embed, o/down rows (write); q/k/v/gate/up, lm_head (read) | –                   |
| attn_value  | head_dim   | v rows per KV head (write); o columns per head (read)     | –                   |
| o_input     | heads      | o columns, across heads (read)               | o_proj input, across heads       |
| down_input  | intermed.  | down columns (read)                          | down_proj input (R4)             |
| qk          | head_dim   | –                                            | Q and K after RoPE (R3)          |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..fakequant.attention import set_qk_transforms
from ..fakequant.inputs import input_pipeline
from ..models.spec import ArchSpec
from ..models.surgery import get_module, linears_of
from ..registry import Registry
from .base import PerBlock, Transform, fold_consumer, fold_producer


@dataclass(frozen=True)
class Dims:
    """The widths a model's sites have."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> "Dims":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_attention_heads,
                   getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim)


@torch.no_grad()
def consume(linear: nn.Linear, t: Transform) -> None:
    """The linear reads the site: ``W ← W M⁻ᵀ`` in float64."""
    linear.weight.data = fold_consumer(linear.weight.data.double(), t).to(linear.weight.dtype)


@torch.no_grad()
def produce(module: nn.Module, t: Transform) -> None:
    """The linear (or embedding, whose rows are outputs) writes the site: ``W ← Mᵀ W``, ``b ← b M``."""
    if isinstance(module, nn.Embedding):
        module.weight.data = t.forward(module.weight.data.double()).to(module.weight.dtype)
        return
    bias = module.bias.data.double() if module.bias is not None else None
    w, b = fold_producer(module.weight.data.double(), bias, t)
    module.weight.data = w.to(module.weight.dtype)
    if b is not None:
        module.bias.data = b.to(module.bias.dtype)


LayerFn = Callable[[nn.Module, ArchSpec, Dims, Transform], None]


@dataclass(frozen=True)
class Site:
    """A place for a transform. ``fuse`` edits a decoder layer's weights; ``attach`` installs the
    online part (None for fully fused sites); ``width`` is the transform's own size."""

    name: str
    width: Callable[[Dims], int]
    fuse: LayerFn | None
    attach: LayerFn | None = None
    per_layer: bool = True

    @property
    def online(self) -> bool:
        return self.attach is not None


def _fuse_residual(layer, spec, dims, t):
    lin = linears_of(layer, spec)
    for role in ("q", "k", "v", "gate", "up"):
        consume(lin[role], t)
    for role in ("o", "down"):
        produce(lin[role], t)


def fuse_residual_rest(model: nn.Module, spec: ArchSpec, t: Transform) -> None:
    """The model-level part of the residual site: embeddings write it, lm_head reads it."""
    produce(get_module(model, spec.embed), t)
    consume(get_module(model, spec.lm_head), t)


def _fuse_attn_value(layer, spec, dims, t):
    lin = linears_of(layer, spec)
    produce(lin["v"], PerBlock(t, dims.kv_heads))
    consume(lin["o"], PerBlock(t, dims.heads))  # every query head of a group reads its KV head's values


def _consume_role(role: str) -> LayerFn:
    return lambda layer, spec, dims, t: consume(linears_of(layer, spec)[role], t)


def _online_input(role: str) -> LayerFn:
    def attach(layer, spec, dims, t):
        input_pipeline(linears_of(layer, spec)[role]).set("plan", [t.forward])
    return attach


def _attach_qk(layer, spec, dims, t):
    set_qk_transforms(get_module(layer, spec.attention), [lambda q, k: (t.forward(q), t.forward(k))])


SITES: Registry[Site] = Registry("transform site")
for _site in (
    Site("residual", lambda d: d.hidden, _fuse_residual),
    Site("attn_value", lambda d: d.head_dim, _fuse_attn_value),
    Site("o_input", lambda d: d.heads, _consume_role("o"), _online_input("o")),
    Site("down_input", lambda d: d.intermediate, _consume_role("down"), _online_input("down")),
    Site("qk", lambda d: d.head_dim, None, _attach_qk),
):
    SITES.add(_site.name, _site)
# Fusing order within a layer: o's columns take attn_value before the online o_input transform.
SITE_ORDER = ("residual", "attn_value", "o_input", "down_input", "qk")
