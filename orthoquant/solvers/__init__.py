"""Weight solvers: pure functions ``solve(W, H, fmt, spec) -> SolveResult`` in a registry.

A solver sees one linear's weight ``W`` (out x in, float32) and, when it needs one, the second moment
``H = E[x xᵀ]`` (in x in, float64) of that linear's input. It never touches modules, hooks or devices:
the layer-wise runner does the wiring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..registry import Registry

if TYPE_CHECKING:
    from ..config import SolverSpec
    from ..transforms.base import Transform
    from ..formats.base import QuantFormat, QuantizedTensor


@dataclass
class SolveResult:
    """What a solver returns for one linear.

    :param weight: (out, in) float32 dequantized weight, exactly ``fmt.dequantize(qweight)``.
    :param qweight: codes and scales.
    :param loss: proxy loss ``tr(ΔW H ΔWᵀ)`` (``‖ΔW‖²`` when no H is given).
    :param input_transform: an online transform the solver chose for this linear's input (WUSH
        blocks, QuIP#'s input RHT): at inference ``x → input_transform.forward(x)``, and ``weight``
        is expressed in that transformed space.
    :param output_transform: an online transform of the linear's output (QuIP#'s output RHT).
    """

    weight: torch.Tensor
    qweight: "QuantizedTensor"
    loss: float
    input_transform: "Transform | None" = None
    output_transform: "Transform | None" = None


@dataclass(frozen=True)
class Solver:
    """A registered solver: the function and whether it needs the input's second moment."""

    solve: Callable[[torch.Tensor, torch.Tensor | None, "QuantFormat", "SolverSpec"], SolveResult]
    needs_hessian: bool


SOLVERS: Registry[Solver] = Registry("solver")


def proxy_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """``tr(ΔW H ΔWᵀ)``, or ``‖ΔW‖²`` when H is None.

    A float32 GEMM with a float64 sum: it is a metric, and in float64 it cost a third of GPTQ's time.
    """
    d = W.float() - Wq.float()
    if H is None:
        return float((d * d).double().sum())
    return float(((d @ H.to(d)) * d).double().sum())


from . import rtn  # noqa: E402,F401  (registration)
from . import gptq  # noqa: E402,F401  (registration)
from . import block_transformed  # noqa: E402,F401  (registration)
from . import ldlq  # noqa: E402,F401  (registration)
from . import quip  # noqa: E402,F401  (registration)
