"""Fused linears (Phi-3's ``qkv_proj`` and ``gate_up_proj``) held as their parts.

A fused linear is several linears stacked by output rows: ``qkv_proj`` is ``[q; k; v]``, Phi-3's
``gate_up_proj`` is ``[gate; up]`` (its MLP splits the output with ``chunk(2)``). Every site, solver and
quantizer works on nn.Linear roles, so the fused module is replaced by a :class:`FusedLinear` whose
parts are nn.Linear children (``self_attn.qkv_proj.q_proj``, …) and whose forward concatenates their
outputs: the same function, and the model's own forward is untouched. Then

- R1 on the fused input is R1 on each part's input (the parts share it);
- R2 on the v part of the fused output is R2 on the ``v_proj`` part;
- GPTQ on the fused weight with one H is GPTQ on each part with that H: the parts read one input (one
  norm group, one Hessian), and GPTQ's rows are independent given H (its column order, act-order and
  error feedback depend on H only), so the codes are those of the fused weight.

Checkpoints keep the fused layout: :func:`fused_slices` tells the reader which rows of which stored
tensor each part is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class FusedSpec:
    """A fused linear of each decoder layer: its path, its parts' names and their row counts."""

    path: str
    parts: tuple[str, ...]
    rows: Callable[[object], tuple[int, ...]]  # config -> rows of each part


class FusedLinear(nn.Module):
    """Linears stacked by output rows, each an nn.Linear child; ``y = [part₁(x), part₂(x), …]``."""

    def __init__(self, parts: dict[str, nn.Linear]) -> None:
        super().__init__()
        self.names = tuple(parts)
        for name, linear in parts.items():
            self.add_module(name, linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self, n)(x) for n in self.names], dim=-1)


def _split(fused: nn.Linear, names: tuple[str, ...], rows: tuple[int, ...]) -> FusedLinear:
    if sum(rows) != fused.out_features:
        raise ValueError(f"parts {dict(zip(names, rows))} do not add up to {fused.out_features} rows")
    w, b, start, parts = fused.weight, fused.bias, 0, {}
    for name, n in zip(names, rows):
        part = nn.Linear(fused.in_features, n, bias=b is not None, device=w.device, dtype=w.dtype)
        if w.device.type != "meta":
            with torch.no_grad():
                part.weight.copy_(w[start:start + n])
                if b is not None:
                    part.bias.copy_(b[start:start + n])
        parts[name], start = part, start + n
    return FusedLinear(parts)


def split_fused_(model: nn.Module, arch) -> None:
    """Replace every fused linear of ``arch.fused`` in each decoder layer by its parts, in place
    (idempotent: an already split model is left as it is)."""
    layers = model.get_submodule(arch.layers)
    for fused in arch.fused:
        rows = fused.rows(model.config)
        for layer in layers:
            parent, _, leaf = fused.path.rpartition(".")
            owner = layer.get_submodule(parent) if parent else layer
            module = getattr(owner, leaf)
            if isinstance(module, nn.Linear):
                setattr(owner, leaf, _split(module, fused.parts, rows))


def fused_slices(arch, config, n_layers: int) -> dict[str, tuple[str, int, int]]:
    """Stored name of each part's weight/bias -> (stored fused name, first row, end row)."""
    slices = {}
    for fused in arch.fused:
        start = 0
        for name, n in zip(fused.parts, fused.rows(config)):
            for i in range(n_layers):
                for leaf in ("weight", "bias"):
                    stored = f"{arch.layers}.{i}.{fused.path}.{leaf}"
                    slices[f"{arch.layers}.{i}.{fused.path}.{name}.{leaf}"] = (stored, start, start + n)
            start += n
    return slices
