"""Weight solvers: pure functions ``solve(W, H, fmt, spec) -> SolveResult`` in a registry.

A solver sees one linear's weight ``W`` (out x in, float32) and, when it needs one, the second moment
``H = E[x xᵀ]`` (in x in, float64) of that linear's input. It never touches modules, hooks or devices:
the layer-wise runner does the wiring.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ..choices import SOLVER_NAMES
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


def check_format(fmt: "QuantFormat", spec: "SolverSpec", rows: int, cols: int) -> None:
    """The shape check every solver makes: ``fmt`` can hold a (rows, cols) weight (groups divide it)."""
    fmt.check_shape(rows, cols)


@dataclass(frozen=True)
class Solver:
    """A registered solver: the function, whether it needs the input's second moment, and ``check``:
    ``check(fmt, spec, rows, cols)`` raises the :class:`~orthoquant.errors.ConfigError` that solving a
    (rows, cols) weight would raise, without any weight (a request is validated before a run starts)."""

    solve: Callable[[torch.Tensor, torch.Tensor | None, "QuantFormat", "SolverSpec"], SolveResult]
    needs_hessian: bool
    check: Callable[["QuantFormat", "SolverSpec", int, int], None] = check_format


SOLVERS: Registry[Solver] = Registry("solver", names=SOLVER_NAMES)  # the recipe schema checks names there


# Below this many columns proxy_loss multiplies by the whole diagonal block of H; above, it halves.
LOSS_LEAF = 256
# Columns of H converted to float32 at a time: bounds the extra memory to n·LOSS_CHUNK floats.
LOSS_CHUNK = 2048


def proxy_loss(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor | None) -> float:
    """``tr(ΔW H ΔWᵀ)``, or ``‖ΔW‖²`` when H is None.

    Float32 GEMMs with a float64 sum: it is a metric, and in float64 it cost a third of GPTQ's time.
    """
    d = W.float() - Wq.float()
    if H is None:
        return float(d.square().sum(dtype=torch.float64))
    return float(_symmetric_trace(d, H, 0, d.shape[1]))


def _symmetric_trace(d: torch.Tensor, H: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """() float64 ``tr(d_s H_ss d_sᵀ)`` for the columns s = a..b.

    H is symmetric: with s split in halves A, B the trace is ``tr(A) + tr(B) + 2·tr(d_A H_AB d_Bᵀ)``,
    so only the upper triangle is multiplied, m·n² flops instead of the 2·m·n² of ``d @ H``, in GEMMs
    about as large as the halves.
    """
    if b - a <= LOSS_LEAF:
        return _cross(d, H, a, b, a, b)
    mid = (a + b) // 2
    return (_symmetric_trace(d, H, a, mid) + _symmetric_trace(d, H, mid, b)
            + 2 * _cross(d, H, a, mid, mid, b))


def _cross(d: torch.Tensor, H: torch.Tensor, a: int, b: int, c: int, e: int) -> torch.Tensor:
    """() float64 ``tr(d_A H_AB d_Bᵀ)`` for the columns A = a..b, B = c..e.

    Same flops either way; the Gram form ``Σ (d_Aᵀ d_B) ∘ H_AB`` leaves |A|·|B| products to sum instead
    of m·|B|, so it serves whenever d has more rows than B has columns. H goes to float32 a block of at
    most :data:`LOSS_CHUNK` columns at a time.
    """
    total = torch.zeros((), dtype=torch.float64, device=d.device)
    for c1 in range(c, e, LOSS_CHUNK):
        c2 = min(c1 + LOSS_CHUNK, e)
        Hb = H[a:b, c1:c2].to(d)
        if d.shape[0] >= c2 - c1:
            total += _dot(d[:, a:b].T @ d[:, c1:c2], Hb)
        else:
            total += _dot(d[:, a:b] @ Hb, d[:, c1:c2])
    return total


def _dot(P: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    """() float64 ``Σ P ∘ Q``: float32 row sums (fast and short), summed in float64."""
    return torch.linalg.vecdot(P, Q).sum(dtype=torch.float64)


from . import rtn  # noqa: E402,F401  (registration)
from . import gptq  # noqa: E402,F401  (registration)
from . import block_transformed  # noqa: E402,F401  (registration)
from . import ldlq  # noqa: E402,F401  (registration)
from . import quip  # noqa: E402,F401  (registration)
