"""Function-preserving model edits: module access by dotted name, untying embeddings, folding norms.

All weight arithmetic runs in float64 and is cast back, so folds do not accumulate rounding.
"""
from __future__ import annotations

import torch
from torch import nn

from .layout import to_layout_
from .spec import ArchSpec, NormGroup


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def layers_of(model: nn.Module, arch: ArchSpec) -> nn.ModuleList:
    return get_module(model, arch.layers)


def linears_of(layer: nn.Module, arch: ArchSpec) -> dict[str, nn.Linear]:
    """The layer's projections by role."""
    return {role: get_module(layer, path) for role, path in arch.linears}


def untie_embeddings(model: nn.Module, arch: ArchSpec) -> None:
    """Give lm_head its own weight: transforms and quantizers treat it apart from the embedding."""
    head, embed = get_module(model, arch.lm_head), get_module(model, arch.embed)
    if head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr():
        head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = {}


def _scale_inputs(linear: nn.Linear, gamma: torch.Tensor) -> None:
    """``W ← W · diag(γ)``: the linear absorbs a per-input-channel scale."""
    w = linear.weight
    w.data = (w.data.double() * gamma.double()).to(w.dtype)


def fold_norm(norm: nn.Module, consumers: list[nn.Linear]) -> None:
    """Fold an RMSNorm's γ into the linears that read it and set γ := 1 (exact)."""
    if getattr(norm, "bias", None) is not None:  # no RMSNorm of the supported families has one
        raise NotImplementedError(f"folding a norm with a bias ({type(norm).__name__}) is not supported")
    gamma = norm.weight.detach().clone()
    for lin in consumers:
        _scale_inputs(lin, gamma)
    norm.weight.data.fill_(1.0)


def readers_of(layer: nn.Module, arch: ArchSpec, group: NormGroup) -> list[nn.Module]:
    """Everything that reads a norm group's output: its linears, then its other readers (a MoE router)."""
    lin = linears_of(layer, arch)
    return [lin[r] for r in group.roles] + [get_module(layer, p) for p in group.readers]


def fold_layer_norms(layer: nn.Module, arch: ArchSpec) -> None:
    """Fold every norm of one decoder layer into its consumers (a MoE router among them)."""
    for group in arch.norm_groups:
        fold_norm(get_module(layer, group.norm), readers_of(layer, arch, group))


def fold_final_norm(model: nn.Module, arch: ArchSpec) -> None:
    """Fold the final norm into lm_head (call :func:`untie_embeddings` first)."""
    fold_norm(get_module(model, arch.final_norm), [get_module(model, arch.lm_head)])


def fold_all_norms(model: nn.Module, arch: ArchSpec) -> None:
    """Untie, then fold every RMSNorm (layers and final) of an in-memory model (put in orthoquant's layout)."""
    to_layout_(model, arch)
    untie_embeddings(model, arch)
    for layer in layers_of(model, arch):
        fold_layer_norms(layer, arch)
    fold_final_norm(model, arch)
