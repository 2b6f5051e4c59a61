"""Round to nearest: every weight to its nearest grid point, all groups at once."""
from __future__ import annotations

import torch

from .base import SOLVERS, SolveResult, Solver
from .loss import proxy_loss


def solve_rtn(W: torch.Tensor, H: torch.Tensor | None, fmt, spec=None) -> SolveResult:
    """Quantize ``W`` (out, in) with ``fmt``; ``H`` only serves the reported proxy loss."""
    q = fmt.quantize(W.float())
    Wq = fmt.dequantize(q)
    return SolveResult(Wq, q, proxy_loss(W, Wq, H))


SOLVERS.add("rtn", Solver(solve_rtn, needs_hessian=False))
