"""Where each weight's rounding starts from: its *anchor*, the value the solver rounded.

Learned rounding chooses between the two grid points around each weight's anchor. For RTN the anchor is
the full-precision weight (AutoRound's setting). GPTQ rounds each column after the errors of the columns
before it were fed back, so the value it rounded is its updated weight ``Q + r`` with the rounding
residuals ``r = (W − Q)·R·diag(R)⁻¹`` (``R`` the upper factor of the damped ``H`` in processing order;
:func:`orthoquant.solvers.gptq.ldl_loss` derives them). Anchored there, learned rounding starts from
GPTQ's codes with GPTQ's own distances to the rounding boundaries.

Measured on the test suite's trained model (W4 g32, 200 steps): from GPTQ's codes, whose errors are
compensated across columns, every flipped code costs a full uncompensated step, and the layer loss
first rises about 1.7x and ends above GPTQ's (then the stage keeps GPTQ's codes); from RTN's codes it
falls 4-5x. The rounding presets therefore learn from RTN codes, as AutoRound does (``refine.start: rtn``),
and keep GPTQ's codes in the layers where those reconstruct better.

``H`` is the second moment of the full-precision layer's inputs; under true-sequential solving GPTQ saw
slightly different inputs for later linears, so the anchors are approximate there (anchors outside
their code's cell are moved onto its edge by :class:`~.rounding.LinearRounding`).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..config import SolverSpec
from ..solvers.gptq import upper_factor

Anchor = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", SolverSpec], torch.Tensor]


def fp_anchor(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None, solver: SolverSpec) -> torch.Tensor:
    """The full-precision weight itself (RTN rounds it directly)."""
    return W


@torch.no_grad()
def gptq_anchor(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None, solver: SolverSpec) -> torch.Tensor:
    """(out, in) the values GPTQ rounded: its updated weights ``Q + r``.

    :param W: (out, in) FP weight. :param Wq: (out, in) GPTQ's dequantized weight.
    :param H: (in, in) the input second moment (float64).
    """
    H = H.to(W.device)
    dead = H.diagonal() == 0
    order = torch.arange(W.shape[1], device=W.device)
    if solver.act_order:  # the solver's processing order
        order = torch.argsort(torch.where(dead, 1.0, H.diagonal()), descending=True, stable=True)
    R, _ = upper_factor(H, dead, order, solver.damp)
    D = (W.float().masked_fill(dead, 0) - Wq.float())[:, order].to(R.dtype)
    residuals = (D @ (R / R.diagonal())).float()
    updated = torch.empty_like(Wq, dtype=torch.float32)
    updated[:, order] = Wq.float()[:, order] + residuals
    return updated


# solver name -> anchor rule (solvers not listed: fp_anchor)
ANCHORS: dict[str, Anchor] = {"gptq": gptq_anchor}
