"""Second-order input statistics of linear layers, collected through forward pre-hooks.

``H = E[x xᵀ]`` is accumulated as a running mean: each batch's ``xᵀx`` is computed in float32 (fast)
and folded into a float64 mean (exact over many batches), as IST-GPTQ's ``add_batch`` does.
Linears that read the same tensor (q/k/v, gate/up) share one accumulator.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn


class InputStats:
    """Running statistics of the inputs of one linear (or of several sharing an input).

    :ivar H: (d, d) float64 running mean of x xᵀ over tokens.
    :ivar absmax: (d,) float32 running max of |x| per channel.
    :ivar tokens: number of tokens seen.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.absmax = torch.zeros(dim, dtype=torch.float32, device=device)
        self.tokens = 0

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``x`` (..., d)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        total = self.tokens + n
        self.H.mul_(self.tokens / total).add_((x.T @ x).double(), alpha=1 / total)
        self.absmax = torch.maximum(self.absmax, x.abs().amax(0).to(self.absmax))
        self.tokens = total


@contextmanager
def collect_input_stats(groups: dict[str, nn.Linear]) -> Iterator[dict[str, InputStats]]:
    """Within the block, record the inputs of each named linear.

    :param groups: name -> the linear whose input is recorded; pass one linear per shared input.
    :yields: name -> :class:`InputStats`, filled while the block runs forwards.
    """
    stats = {name: InputStats(lin.in_features, lin.weight.device) for name, lin in groups.items()}
    handles = [lin.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.update(args[0]))
               for name, lin in groups.items()]
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()
