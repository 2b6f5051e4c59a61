"""Weight solvers: pure functions ``solve(W, H, fmt, spec) -> SolveResult`` in a registry; importing
this package registers every solver in :data:`SOLVERS`.

A solver sees one linear's weight ``W`` (out x in, float32) and, when it needs one, the second moment
``H = E[x xᵀ]`` (in x in, float64) of that linear's input. It never touches modules, hooks or devices:
the layer-wise runner does the wiring.
"""
from . import block_transformed, gptq, ldlq, quip, rtn  # noqa: F401  (registration)
from .base import SOLVERS, SolveResult, Solver, check_format
from .loss import proxy_loss

__all__ = ["SOLVERS", "SolveResult", "Solver", "check_format", "proxy_loss"]
