"""Function-preserving model edits: module access by dotted name, untying embeddings, folding norms.

All weight arithmetic runs in float64 and is cast back, so folds do not accumulate rounding.
"""
from __future__ import annotations

from typing import Callable

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


# float64 bytes of the rows one fold step holds: an embedding or lm_head of a 128k vocabulary is 4 GiB in
# float64 (Llama-3-8B), which a whole-matrix fold would allocate (twice) next to the weight itself.
FOLD_BLOCK_BYTES = 32 * 2**20


@torch.no_grad()
def map_rows_(weight: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``W ← fn(W)`` computed in float64 and cast back into ``weight`` in place, one block of rows at a
    time (:data:`FOLD_BLOCK_BYTES`), so the float64 transient is a block, not a copy of the matrix.
    ``fn`` must map each row on its own (a fold over the last axis); the result equals the whole-matrix
    fold's."""
    rows = max(1, FOLD_BLOCK_BYTES // (8 * max(1, weight[0].numel())))
    for start in range(0, weight.shape[0], rows):
        block = weight[start:start + rows]
        block.copy_(fn(block.double()))


def _scale_inputs(linear: nn.Linear, gamma: torch.Tensor) -> None:
    """``W ← W · diag(γ)``: the linear absorbs a per-input-channel scale."""
    scale = gamma.double()
    map_rows_(linear.weight.data, lambda rows: rows * scale)


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
