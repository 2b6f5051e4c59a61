"""Refinement of solved layers by block reconstruction (see :mod:`.reconstruct` for the mechanism,
:mod:`.rounding` for learned rounding, :mod:`.stage` for the runner's stage).

Only names the recipe schema needs are imported here, so ``orthoquant.config`` stays light.
"""
from __future__ import annotations

from .reconstruct import OPTIMIZERS
from .rounding import GRIDS

# What ``refine.method`` can learn.
METHODS = ("round",)
# What a layer is fit to (see RefineSpec.target).
TARGETS = ("fp_model", "fp_layer")
# Solvers that leave a linear's codes in its own basis (no solver-chosen online transform).
REFINABLE_SOLVERS = ("rtn", "gptq", "ldlq", "ldlq-tune")


def refinable_formats() -> list[str]:
    return GRIDS.names()


__all__ = ["METHODS", "OPTIMIZERS", "REFINABLE_SOLVERS", "TARGETS", "refinable_formats"]
