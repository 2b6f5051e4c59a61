"""orthoquant's in-memory layout of a model, and how a stock checkpoint maps onto it.

Every tool works on nn.Linear roles and plain RMSNorms. Three stock layouts differ and are converted
once, where a model is built or handed in: GPT-2's Conv1D (weights stored (in, out), :mod:`.generic`),
fused linears (Phi-3, :mod:`.fused`) and Gemma's (1 + γ) norms (:mod:`.norms`). :func:`stored_views`
tells the checkpoint reader how each converted parameter is read from the stock tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .fused import fused_slices, split_fused_
from .generic import linearize_conv1d_
from .norms import PlainRMSNorm, plain_norms_


def to_layout_(model: nn.Module, spec) -> None:
    """Convert a stock model to orthoquant's layout in place (idempotent; the function is unchanged)."""
    linearize_conv1d_(model)
    split_fused_(model, spec)
    plain_norms_(model, spec)


@dataclass(frozen=True)
class StoredViews:
    """How parameters of the converted model are read from a stock checkpoint.

    :ivar transposed: names stored transposed (Conv1D).
    :ivar slices: name -> (stored name, first row, end row) (fused parts).
    :ivar offsets: name -> what to add to the stored value (Gemma's norms: 1).
    """

    transposed: frozenset[str] = frozenset()
    slices: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    offsets: dict[str, float] = field(default_factory=dict)


def stored_views(spec, config, skeleton: nn.Module) -> StoredViews:
    """The views of a converted ``skeleton`` built from ``config``."""
    offsets = {f"{p}.weight": spec.norm_offset for p, m in skeleton.named_modules() if isinstance(m, PlainRMSNorm)}
    return StoredViews(frozenset(f"{p}.weight" for p in spec.transposed),
                       fused_slices(spec, config, config.num_hidden_layers), offsets)
