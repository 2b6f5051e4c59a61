"""Mixture-of-experts layers (Qwen3-MoE, Mixtral) with their experts as nn.Linear modules.

transformers 5 keeps a layer's experts as two 3-D parameters, ``experts.gate_up_proj`` (experts,
2·inter, hidden) and ``experts.down_proj`` (experts, hidden, inter). Hub checkpoints and vLLM's
fused-MoE loader name them per expert (``experts.N.gate_proj``, ``up_proj``, ``down_proj``), and every
solver and quantizer works on nn.Linear, so :func:`unstack_experts_` holds them as an
:class:`ExpertList` of :class:`Expert` modules under exactly those names (the same function). Then:

- each expert's gate/up read the tokens routed to it (one tensor, one Hessian: found by the generic
  path's hooks), and its down_proj its own activations, so GPTQ solves each expert on its own tokens;
- the router (``mlp.gate``) is no nn.Linear and stays in full precision; it reads the MLP norm's output,
  so the norm's γ and the residual-stream transforms fold into it (``ArchSpec.experts``, ``NormGroup.readers``);
- ``calibration.moe_all_experts`` routes every token through every expert while statistics are
  collected (:func:`route_all`), never while the quantized layer's outputs are propagated;
- an expert that saw fewer tokens than its input width gets a damped Hessian and a log line
  (:func:`sparse_hessian`), never silently RTN.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)
# transformers 5's stacked expert tensor -> the per-expert linears it holds, in row order (gate first)
STACKED_PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class Expert(nn.Module):
    """One expert: ``down(act(gate(x)) ⊙ up(x))``."""

    def __init__(self, hidden: int, inter: int, act_fn, like: torch.Tensor) -> None:
        super().__init__()
        kw = dict(bias=False, device=like.device, dtype=like.dtype)
        self.gate_proj, self.up_proj = nn.Linear(hidden, inter, **kw), nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class ExpertList(nn.ModuleList):
    """The experts of one layer, called as transformers' ``*Experts`` module is (same arithmetic)."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            e = int(index[0])
            if e == len(self):
                continue
            top_k_pos, token_idx = torch.where(mask[e])
            y = self[e](hidden_states[token_idx]) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _is_stacked(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and module.gate_up_proj.ndim == 3


def _unstack(stacked: nn.Module) -> ExpertList:
    gate_up, down = stacked.gate_up_proj, stacked.down_proj
    n, two_inter, hidden = gate_up.shape
    inter = two_inter // 2
    experts = ExpertList([Expert(hidden, inter, stacked.act_fn, gate_up) for _ in range(n)])
    if gate_up.device.type != "meta":
        with torch.no_grad():
            for e, expert in enumerate(experts):
                expert.gate_proj.weight.copy_(gate_up[e, :inter])
                expert.up_proj.weight.copy_(gate_up[e, inter:])
                expert.down_proj.weight.copy_(down[e])
    return experts


def unstack_experts_(model: nn.Module) -> tuple[str, ...]:
    """Replace every stacked-experts module by an :class:`ExpertList`, in place; returns their paths."""
    paths = tuple(p for p, m in model.named_modules() if _is_stacked(m))
    for path in paths:
        parent, _, leaf = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, _unstack(getattr(owner, leaf)))
    return paths


def expert_views(skeleton: nn.Module, stored: set[str]) -> dict[str, tuple[str, int, int, int]]:
    """Per-expert weight name -> (stacked stored name, expert, first row, end row), for checkpoints that
    store the stacked layout (saved by transformers 5); per-expert checkpoints are read by name."""
    views = {}
    for path, module in skeleton.named_modules():
        if not isinstance(module, ExpertList):
            continue
        for name, leaves in STACKED_PARTS.items():
            if f"{path}.{name}" not in stored:
                continue
            for e in range(len(module)):
                start = 0
                for leaf in leaves:  # stacked in this order along the rows
                    end = start + getattr(module[e], leaf).out_features
                    views[f"{path}.{e}.{leaf}.weight"] = (f"{path}.{name}", e, start, end)
                    start = end
    return views


@contextmanager
def route_all(layer: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, every router of ``layer`` sends each token to every expert (statistics only)."""
    routers = [m for m in layer.modules() if enabled and hasattr(m, "top_k") and hasattr(m, "num_experts")
               and isinstance(getattr(m, "weight", None), nn.Parameter)]
    saved = [r.top_k for r in routers]
    for r in routers:
        r.top_k = r.num_experts
    try:
        yield
    finally:
        for r, k in zip(routers, saved):
            r.top_k = k


def sparse_hessian(H: torch.Tensor, tokens: int, where: str) -> torch.Tensor:
    """``H`` as is when it saw at least as many tokens as its width; else damped by its mean diagonal
    (the identity when it saw none) and logged, so a rarely routed expert is solved, not guessed."""
    width = H.shape[0]
    if tokens >= width:
        return H
    scale = float(H.diagonal().mean()) if tokens else 0.0
    log.warning("%s saw %d calibration tokens for %d input channels; its Hessian is damped by %s",
                where, tokens, width, "the identity" if not tokens else f"{scale:.3g}·I")
    return H + (scale if tokens else 1.0) * torch.eye(width, dtype=H.dtype, device=H.device)
