"""orthoquant's in-memory layout of a model, and how a stock checkpoint maps onto it.

Every tool works on nn.Linear roles and plain RMSNorms. Three stock layouts differ and are converted
once, where a model is built or handed in: GPT-2's Conv1D (weights stored (in, out), :mod:`.generic`),
fused linears (Phi-3, :mod:`.fused`) and Gemma's (1 + γ) norms (:mod:`.norms`). :func:`stored_views`
tells the checkpoint reader how each converted parameter is read from the stock tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError

from .experts import expert_views, unstack_experts_
from .fused import fused_slices, split_fused_
from .generic import linearize_conv1d_
from .norms import PlainRMSNorm, plain_norms_


def to_layout_(model: nn.Module, arch) -> None:
    """Convert a stock model to orthoquant's layout in place (idempotent; the function is unchanged)."""
    linearize_conv1d_(model)
    unstack_experts_(model)
    split_fused_(model, arch)
    plain_norms_(model, arch)


@dataclass(frozen=True)
class StoredViews:
    """How parameters of the converted model are read from a stock checkpoint.

    :ivar transposed: names stored transposed (Conv1D).
    :ivar slices: name -> (stored name, first row, end row) (fused parts).
    :ivar offsets: name -> what to add to the stored value (Gemma's norms: 1).
    :ivar experts: name -> (stacked stored name, expert, first row, end row) (MoE experts, :mod:`.experts`).
    """

    transposed: frozenset[str] = frozenset()
    slices: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    offsets: dict[str, float] = field(default_factory=dict)
    experts: dict[str, tuple[str, int, int, int]] = field(default_factory=dict)


def stored_views(arch, config, skeleton: nn.Module, stored: set[str] = frozenset()) -> StoredViews:
    """The views of a converted ``skeleton`` built from ``config`` (``stored``: the checkpoint's names)."""
    offsets = {f"{p}.weight": arch.norm_offset for p, m in skeleton.named_modules() if isinstance(m, PlainRMSNorm)}
    return StoredViews(frozenset(f"{p}.weight" for p in arch.transposed),
                       fused_slices(arch, config, config.num_hidden_layers), offsets, expert_views(skeleton, stored))


def _parts_of(views: StoredViews) -> dict[str, list[tuple[str, int]]]:
    """Fused module name -> [(part module name, rows)] in row order."""
    fused: dict[str, list[tuple[str, int]]] = {}
    for name, (stored, start, end) in sorted(views.slices.items(), key=lambda kv: (kv[1][0], kv[1][1])):
        if name.endswith(".weight"):
            fused.setdefault(stored.rpartition(".")[0], []).append((name.rpartition(".")[0], end - start))
    return fused


def _merged(values: list[torch.Tensor], rows: list[int], suffix: str, where: str) -> torch.Tensor:
    """One tensor of a fused linear from its parts': stacked by rows where each part has its own rows,
    ``weight_shape`` summed, anything else (a shared scale, g_idx) equal in every part."""
    if suffix == "weight_shape":
        return torch.tensor([sum(int(v[0]) for v in values), int(values[0][1])], dtype=values[0].dtype)
    if all(v.ndim and v.shape[0] == n for v, n in zip(values, rows)):
        return torch.cat(values)
    if any(not torch.equal(v, values[0]) for v in values):
        raise UserError(f"{where}: the parts of this fused linear hold different {suffix} values, which its one "
                        "stock module cannot; export with --format native")
    return values[0]


def to_stock(tensors: dict[str, torch.Tensor], views: StoredViews) -> dict[str, torch.Tensor]:
    """Tensors of orthoquant's layout under the stock model's names and conventions: a fused linear's parts
    merged (their dense, packed or scale tensors stacked by rows), Gemma's γ stored without its 1."""
    out = {k: (v.double() - views.offsets[k]).to(v.dtype) if k in views.offsets else v for k, v in tensors.items()}
    for fused, parts in _parts_of(views).items():
        names = [p for p, _ in parts]
        suffixes = {k[len(names[0]) + 1:] for k in out if k.startswith(names[0] + ".")}
        for suffix in suffixes:
            values = [out.pop(f"{p}.{suffix}") for p in names]
            out[f"{fused}.{suffix}"] = _merged(values, [n for _, n in parts], suffix, fused)
    return out


def from_stock(tensors: dict[str, torch.Tensor], views: StoredViews) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_stock` for dense tensors (a decoded stock checkpoint)."""
    out = dict(tensors)
    for name, (stored, start, end) in views.slices.items():
        if stored in tensors:
            out[name] = tensors[stored][start:end]
    for stored in {s for s, _, _ in views.slices.values()}:
        out.pop(stored, None)
    return {k: (v.double() + views.offsets[k]).to(v.dtype) if k in views.offsets else v for k, v in out.items()}
