"""Where folded weights go, and the head-layout wrappers that sites need.

The site table folds transforms with :func:`consume` and :func:`produce`. Both read and write through
a *folding*: :data:`IN_PLACE` (deployment: float64 arithmetic written back into the module's own dtype)
or :class:`Live` (fitting: differentiable results kept apart from the modules, so the transforms'
parameters receive gradients). The arithmetic is the same pure function either way
(:func:`~orthoquant.transforms.base.fold_consumer` / :func:`~orthoquant.transforms.base.fold_producer`),
which is what keeps the fitted model and the deployed model one and the same.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Transform, fold_consumer, fold_producer


class InPlace:
    """Deployment: read parameters as float64, write results back cast to the parameter's dtype."""

    def read(self, module: nn.Module, name: str) -> torch.Tensor | None:
        p = getattr(module, name, None)
        return None if p is None else p.detach().double()

    @torch.no_grad()
    def write(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        p = getattr(module, name)
        p.data = value.to(p.dtype)


IN_PLACE = InPlace()


class Live:
    """Fitting: results stay in :attr:`values`, keyed by (module, parameter name), with their graph.

    The first read of a parameter returns the module's own tensor (float32 at least, so bfloat16
    weights fold at the precision of the float32 masters); later reads see earlier writes.
    """

    def __init__(self) -> None:
        self.values: dict[tuple[nn.Module, str], torch.Tensor] = {}

    def read(self, module: nn.Module, name: str) -> torch.Tensor | None:
        if (module, name) in self.values:
            return self.values[(module, name)]
        p = getattr(module, name, None)
        if p is None:
            return None
        return p if p.dtype in (torch.float32, torch.float64) else p.float()

    def write(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        self.values[(module, name)] = value


Folding = InPlace | Live


def consume(linear: nn.Module, t: Transform, folding: Folding = IN_PLACE) -> None:
    """The linear reads the site: ``W ← W M⁻ᵀ``."""
    folding.write(linear, "weight", fold_consumer(folding.read(linear, "weight"), t))


def produce(module: nn.Module, t: Transform, folding: Folding = IN_PLACE) -> None:
    """The module writes the site: ``W ← Mᵀ W`` and ``b ← b M`` for a linear; embedding rows are
    outputs (``E ← E M``); a norm's γ is its output scale, so only a diagonal M folds there (γ ← γ M)."""
    w = folding.read(module, "weight")
    if isinstance(module, nn.Linear):
        w, b = fold_producer(w, folding.read(module, "bias"), t)
        if b is not None:
            folding.write(module, "bias", b)
    else:  # embedding rows, or a norm's γ: both are vectors the site's activations are made of
        w = t.forward(w)
    folding.write(module, "weight", w)


class Dual(Transform):
    """``M⁻ᵀ`` of a transform: what the query side needs when keys take ``M`` (q·k is unchanged)."""

    def __init__(self, inner: Transform) -> None:
        self.inner, self.dim, self.orthogonal = inner, inner.dim, inner.orthogonal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.consumer(x)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner.forward(x)


class ToQueryHeads(Transform):
    """A per-KV-head transform (width kv_heads·head_dim, block-diagonal per head) seen from the query
    heads: query head h reads KV head ``h // n_rep`` (transformers' ``repeat_kv`` layout), so each of
    the ``n_rep`` interleaved copies takes the same KV-head blocks.

    :param inner: transform of width kv_heads·head_dim.
    """

    def __init__(self, inner: Transform, n_rep: int, head_dim: int) -> None:
        self.inner, self.n_rep, self.head_dim = inner, n_rep, head_dim
        self.dim, self.orthogonal = inner.dim * n_rep, inner.orthogonal

    def _map(self, x: torch.Tensor, fn) -> torch.Tensor:
        lead, kv = x.shape[:-1], self.inner.dim // self.head_dim
        y = x.reshape(*lead, kv, self.n_rep, self.head_dim).transpose(-3, -2)  # (..., n_rep, kv, hd)
        y = fn(y.reshape(*lead, self.n_rep, self.inner.dim))
        return y.reshape(*lead, self.n_rep, kv, self.head_dim).transpose(-3, -2).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, self.inner.forward)

    def consumer(self, x: torch.Tensor) -> torch.Tensor:
        return self._map(x, self.inner.consumer)


def to_query_heads(t: Transform, heads: int, kv_heads: int, head_dim: int) -> Transform:
    """``t`` (width kv_heads·head_dim) expanded to the query heads; itself without GQA."""
    return t if heads == kv_heads else ToQueryHeads(t, heads // kv_heads, head_dim)
