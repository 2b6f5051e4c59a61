"""The solver interface: what a solver returns (:class:`SolveResult`), what is registered
(:class:`Solver`) and the registry :data:`SOLVERS` that the solver modules fill."""
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

