"""Solvers are pure: whatever the memory layout of the weight and second moment they are given
(row-major, column-major as a fused rotation leaves it, a strided view), they never write into them,
and the result does not depend on the layout."""
from __future__ import annotations

import pytest
import torch

from orthoquant.config import QuantSpec, SolverSpec
from orthoquant.formats import make_format
from orthoquant.solvers import SOLVERS

INT4_G32 = QuantSpec(bits=4, group_size=32)
MXFP4 = QuantSpec(format="mxfp4", bits=4, group_size=32)
E8P2 = QuantSpec(format="e8p", bits=2, group_size=0)


def format_for(solver: str) -> QuantSpec:
    """The format a solver is used with in the presets (lattice codes need LDLQ's blocks of 8)."""
    if solver.startswith(("wush", "blockhad")):
        return MXFP4
    return E8P2 if solver.startswith("quip-ldlq") else INT4_G32


def layer(m: int = 48, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    X = torch.randn(4 * n, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)
    return W, X.T @ X / X.shape[0]


def layouts(W: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as a row-major, a column-major and a non-contiguous (strided) tensor."""
    wide = torch.zeros(W.shape[0], 2 * W.shape[1])
    wide[:, ::2] = W
    return {"row-major": W.clone(), "column-major": W.T.contiguous().T, "strided": wide[:, ::2]}


# Block-transformed GPTQ keeps the natural column order (act-order is refused there).
CASES = [(name, act_order) for name in SOLVERS.names() for act_order in (False, True)
         if not (act_order and name.startswith(("wush", "blockhad")))]


@pytest.mark.parametrize("name, act_order", CASES)
def test_solvers_never_write_into_their_inputs(name, act_order):
    fmt = make_format(format_for(name))
    W, H = layer()
    spec = SolverSpec(name=name, act_order=act_order)
    reference = None
    for kind, given in layouts(W).items():
        H_given = H.T.contiguous().T if kind == "column-major" else H.clone()
        torch.manual_seed(0)  # QuIP#'s random signs
        result = SOLVERS.get(name).solve(given, H_given, fmt, spec)
        assert torch.equal(given, W), f"{name} wrote into a {kind} weight"
        assert torch.equal(H_given, H), f"{name} wrote into a {kind} second moment"
        reference = result.weight if reference is None else reference
        assert torch.equal(result.weight, reference), f"{name}'s result depends on the {kind} layout"
