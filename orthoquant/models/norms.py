"""Gemma's RMSNorm convention, ``x̂ · (1 + γ)``, turned into the plain one, ``x̂ · γ'`` with ``γ' = 1 + γ``.

Folding a norm into its readers, diagonal sites on a norm and Qwen3-style q/k-norm scales all treat γ as
the output scale. Rather than teach each of them an offset, a Gemma model's norms are replaced by
:class:`PlainRMSNorm` holding ``1 + γ`` (the same function: Gemma adds the 1 in float32, and a float32
γ' = fl(1 + γ) is that very number), and the checkpoint reader adds the 1 to the stored γ.
"""
from __future__ import annotations

import torch
from torch import nn


class PlainRMSNorm(nn.Module):
    """``x / rms(x) · γ``, computed in float32 as Gemma does, the result cast back to the input's dtype."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * self.weight.to(compute)).type_as(x)


def _plain(norm: nn.Module, offset: float) -> PlainRMSNorm:
    w = norm.weight
    weight = w if w.device.type == "meta" else (w.detach().double() + offset).to(w.dtype)
    return PlainRMSNorm(weight, norm.eps)


def plain_norms_(model: nn.Module, arch) -> tuple[str, ...]:
    """Replace every offset-convention RMSNorm of ``model`` (``spec.norm_offset`` ≠ 0) by a
    :class:`PlainRMSNorm`, in place; returns the replaced modules' paths (none if already plain)."""
    if not arch.norm_offset:
        return ()
    paths = tuple(p for p, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")
                  and not isinstance(m, PlainRMSNorm))
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, _plain(getattr(owner, leaf), arch.norm_offset))
    return paths
